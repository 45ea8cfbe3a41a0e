"""vision_tl: transfer-learning image classification with Lightning and Hydra."""

from vision_tl.core.config import register_resolvers

__version__ = "0.1.0"

register_resolvers()
