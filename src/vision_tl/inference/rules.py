"""The keys of `eval`, `predict`, `explain`, `export` and `audit`, checked before any work
(see `core.validate`)."""

from __future__ import annotations

from omegaconf import DictConfig

from vision_tl.core.engines import ENGINE_RULE
from vision_tl.core.runtime import PRECISIONS
from vision_tl.core.validate import (
    FLAG,
    PROBABILITY,
    WORKERS,
    Allowed,
    Rules,
    integer,
    number,
    one_of,
    or_null,
    path,
    register_rules,
)

RULES = register_rules(
    Rules(
        {
            "batch_size": or_null(integer(1), "the engine's fastest on this device"),
            "inference.engine": ENGINE_RULE,
            "calibration.size": integer(1),
            "num_workers": WORKERS,
            "precision": one_of(*PRECISIONS),
            "top_k": integer(1),
            "reject_threshold": or_null(PROBABILITY, "never reject"),
            "calibrate": FLAG,
            "tta.hflip": FLAG,
            "tta.crops": one_of(1, 5),
            "num_highest_loss": integer(0),
            "review.write": FLAG,
            "review.gradcam": FLAG,
            "review.per_cell": integer(0),
            "submission": Allowed(
                lambda v: isinstance(v, bool | dict | DictConfig),
                "true, false or {write, template}",
            ),
            "submission.write": FLAG,
            "submission.template": or_null(path("file"), "id,label"),
            "apply_operating_point": FLAG,
            "apply_open_set": FLAG,
            "unknown": or_null(path("path"), "not measured"),
            # discover, suggest
            "all_images": FLAG,
            "groups": or_null(integer(2), "chosen by silhouette"),
            "max_groups": integer(2),
            "min_group_size": integer(1),
            "pca_dims": integer(0),
            "per_group": integer(1),
            "k": integer(1),
            "include_unknown": FLAG,
            "strategy": one_of("margin", "cluster_margin"),
            "progress": FLAG,
            "opset": or_null(integer(7), "the exporter's default"),
            "tolerance": number(gt=0),
            "verify": FLAG,
            # audit
            "audit.hash_distance": integer(0),
            "audit.sure_distance": integer(0),
            "audit.min_similarity": number(ge=-1, le=1),
            "audit.folds": integer(2),
            "audit.neighbours": integer(1),
            "audit.outlier_z": number(gt=0),
            "audit.unclaimed": PROBABILITY,
            "audit.thumbnails": integer(0),
        }
    )
)
