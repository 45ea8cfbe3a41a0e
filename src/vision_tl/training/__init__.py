"""Training: the LightningModule, fine-tune policies (a registry), optimisers and schedulers,
callbacks (the feature cache among them), the composition root (`training.build`) and
`run_training` (`training.train`).

The names below are loaded on first use, so importing a light submodule (the config rules)
does not pull in Lightning.
"""

from __future__ import annotations

from vision_tl.core.lazy import lazy_exports

_EXPORTS = {
    "FINETUNE": "finetune",
    "FinetunePolicy": "finetune",
    "build_finetune": "finetune",
    "register_finetune": "finetune",
    "ClassificationTask": "task",
    "build_run": "build",
}

__all__ = sorted(_EXPORTS)


__getattr__ = lazy_exports(__name__, _EXPORTS)
