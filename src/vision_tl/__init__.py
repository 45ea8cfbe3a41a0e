"""vision_tl: transfer-learning image classification with Lightning and Hydra."""

from vision_tl.core.config import register_resolvers

__version__ = "0.1.0"

register_resolvers()


def _register_config_rules() -> None:
    """Each package's table of config checks joins the one schema every command is checked
    against (`core.validate.SCHEMA`): here, so no command can run without all of them."""
    import vision_tl.data.rules
    import vision_tl.inference.rules
    import vision_tl.inference.serving.rules
    import vision_tl.models.rules
    import vision_tl.sweeps.rules
    import vision_tl.training.rules  # noqa: F401


_register_config_rules()
