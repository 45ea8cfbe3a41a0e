"""Training: the LightningModule, fine-tune policies (a registry), optimisers and schedulers,
callbacks (the feature cache among them) and `run_training` (`training.train`)."""

from vision_tl.training.finetune import FINETUNE, FinetunePolicy, build_finetune, register_finetune
from vision_tl.training.task import ClassificationTask

__all__ = [
    "FINETUNE",
    "ClassificationTask",
    "FinetunePolicy",
    "build_finetune",
    "register_finetune",
]
