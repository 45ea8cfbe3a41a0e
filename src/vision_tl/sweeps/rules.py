"""The keys of `select` (backbone selection), checked before any work (see `core.validate`)."""

from __future__ import annotations

from vision_tl.core.validate import Rules, number, or_null, path, register_rules

RULES = register_rules(
    Rules(
        {
            "time_budget": or_null(number(gt=0), "no limit"),
            "weights_dir": or_null(path("folder"), "none"),
        }
    )
)
