"""Sweeps: job status files, resumable and contained multirun jobs, GPU pinning, the report."""
