"""Does the val temperature help on images it was not fitted on? Two-fold check on val.

    python -m vision_tl.eval ckpt_path=RUN/checkpoints/best.ckpt data.root=DIR split=val \\
        calibrate=false hydra.run.dir=OUT
    .venv/bin/python bench/calibration_holdout.py OUT/predictions.csv

Training fits T on the whole val split, so the `val_ece` and `val_nll` it reports are
in-sample. Here val is split in two random halves (seed 0): T is fitted on one half
(`training.calibration.fit_temperature`, as training does) and ECE and NLL are scored on
the other, both ways round. The uncalibrated probabilities' logs serve as logits (softmax
is unchanged by a per-row shift). Prints one line per direction.
"""

from __future__ import annotations

import argparse

import numpy as np
import pandas as pd
import torch

from vision_tl.training.calibration import ece, fit_temperature, nll


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("predictions", help="predictions.csv of eval with calibrate=false")
    args = parser.parse_args()
    frame = pd.read_csv(args.predictions)
    classes = [c.removeprefix("prob_") for c in frame.columns if c.startswith("prob_")]
    probs = frame[[f"prob_{c}" for c in classes]].to_numpy()
    logits = torch.tensor(np.log(np.clip(probs, 1e-12, None)))
    target = torch.tensor([classes.index(t) for t in frame.true_label])
    halves = np.array_split(np.random.default_rng(0).permutation(len(target)), 2)
    for fit, score in ((0, 1), (1, 0)):
        a, b = torch.tensor(halves[fit]), torch.tensor(halves[score])
        t = fit_temperature(logits[a], target[a])
        print(
            f"T={t:.3f} fitted on {len(a)}; held-out {len(b)}: "
            f"ECE {ece(logits[b], target[b]):.4f} -> {ece(logits[b], target[b], t):.4f}, "
            f"NLL {nll(logits[b], target[b]):.4f} -> {nll(logits[b], target[b], t):.4f}"
        )


if __name__ == "__main__":
    main()
