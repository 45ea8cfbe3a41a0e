"""A job's `job_status.json`: its overrides, status and attempts, read by resume and report."""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from vision_tl.core.io import read_json, write_json

STATUS_FILE = "job_status.json"
STATUSES = ("running", "done", "pruned", "failed", "interrupted")


def read_status(job_dir: Path) -> dict[str, Any] | None:
    """The job's recorded status, or None when it never started (or the file is unreadable)."""
    return read_json(Path(job_dir) / STATUS_FILE)


def write_status(job_dir: Path, **fields: Any) -> dict[str, Any]:
    """Update the job's status file atomically; returns the new content."""
    path = Path(job_dir) / STATUS_FILE
    status = {**(read_status(job_dir) or {}), **fields}
    status["updated"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, status)
    return status
