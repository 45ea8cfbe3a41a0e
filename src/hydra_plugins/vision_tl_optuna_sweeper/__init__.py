"""vision_tl's Optuna sweeper for Hydra (`hparams_search=optuna`): found by Hydra's plugin
discovery in its `hydra_plugins` namespace package, shipped in vision_tl's wheel."""
