"""Inference from a checkpoint: loading it, the batched predictor with TTA, and the workers
of the `eval`, `predict`, `explain` and `export` commands (same-named modules here)."""
