"""Does an ensemble's cached feature row carry more than each member? Run by hand after a
`model=ensemble finetune=linear_probe` run on a folder with train/ and val/:

    python bench/ensemble_members_lbfgs.py CACHE_DIR/features

For the ensemble's eval-transform entry (one view, per-member preprocessing), fits the
standard linear-evaluation protocol, L-BFGS logistic regression with C chosen by 5-fold CV
on train only, on each member's slice and on the whole row, and prints val accuracy as
JSON. Accuracy is on val, which nothing here tunes on.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
from sklearn.linear_model import LogisticRegressionCV
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler


def main(root: Path) -> dict:
    entries = [json.loads(p.read_text()) | {"dir": p.parent} for p in root.glob("*/meta.json")]
    entry = next(e for e in entries if e["views"] == 1 and "members" in e["key"]["preprocess"])
    files = entry["files"]
    rows = np.fromfile(entry["dir"] / "features.f32", np.float32).reshape(len(files), -1)
    classes = sorted({Path(f).parent.name for f in files})
    y = np.array([classes.index(Path(f).parent.name) for f in files])
    train = np.array([Path(f).parent.parent.name == "train" for f in files])
    val = np.array([Path(f).parent.parent.name == "val" for f in files])
    bounds = np.cumsum([0, *member_dims(entry, rows.shape[1])])
    slices = {
        b["name"]: slice(int(bounds[i]), int(bounds[i + 1]))
        for i, b in enumerate(entry["key"]["backbones"])
    }
    slices["all members"] = slice(0, rows.shape[1])
    result = {"val_images": int(val.sum())}
    for name, cols in slices.items():
        model = make_pipeline(
            StandardScaler(),
            LogisticRegressionCV(Cs=np.logspace(-4, 2, 13), cv=5, max_iter=5000),
        )
        model.fit(rows[train][:, cols], y[train])
        result[name] = round(float(model.score(rows[val][:, cols], y[val])), 4)
    return result


def member_dims(entry: dict, total: int) -> list[int]:
    """Members' feature sizes: equal split unless given as `DIMS=a,b` on the command line."""
    given = [a for a in sys.argv[2:] if a.startswith("DIMS=")]
    if given:
        return [int(v) for v in given[0][5:].split(",")]
    count = len(entry["key"]["backbones"])
    return [total // count] * count


if __name__ == "__main__":
    print(json.dumps(main(Path(sys.argv[1])), indent=1))
