"""What every part of vision_tl shares: config location, errors, registries, file and CLI helpers.

Nothing here imports data, models, training, inference or sweeps, so any of them can use it.
"""
