"""The keys of `select` (backbone selection) and of cross-validation (`sweeps.cv`),
checked before any work (see `core.validate`)."""

from __future__ import annotations

from vision_tl.core.validate import FLAG, Rules, integer, number, or_null, path, register_rules

RULES = register_rules(
    Rules(
        {
            "time_budget": or_null(number(gt=0), "no limit"),
            "weights_dir": or_null(path("folder"), "none"),
            "cv.folds": or_null(integer(2), "no cross-validation"),
            "cv.ensemble": FLAG,
        }
    )
)
