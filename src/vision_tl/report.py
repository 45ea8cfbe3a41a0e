"""Summarise a sweep: `python -m vision_tl.report SWEEP_DIR` (summary.csv/.md and plots)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from vision_tl.sweeps.report import write_report


def main(argv: Sequence[str] | None = None) -> None:
    """Command line: summarise SWEEP_DIR and print the table."""
    parser = argparse.ArgumentParser(prog="python -m vision_tl.report", description=__doc__)
    parser.add_argument("sweep_dir", type=Path, help="a multirun folder (hydra.sweep.dir)")
    parser.add_argument("--metric", default="best_val_acc", help="column to sort by")
    parser.add_argument("--no-plots", action="store_true", help="only the tables")
    args = parser.parse_args(argv)
    if not args.sweep_dir.is_dir():
        raise SystemExit(f"error: sweep dir {args.sweep_dir} does not exist")
    frame = write_report(args.sweep_dir, args.metric, plots=not args.no_plots)
    if frame.empty:
        raise SystemExit(f"error: no jobs found in {args.sweep_dir}")
    sys.stdout.write((args.sweep_dir / "summary.md").read_text())
    sys.stdout.write(f"\nwritten: {args.sweep_dir / 'summary.csv'}, summary.md\n")


if __name__ == "__main__":
    main()
