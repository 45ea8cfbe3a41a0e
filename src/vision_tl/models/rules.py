"""The `model.*` keys checked before any work (see `core.validate`); backbone and head
names are checked where their registries are read, with the list of known names."""

from __future__ import annotations

from vision_tl.core.validate import FLAG, Rules, register_rules

RULES = register_rules(Rules({"model.pretrained": FLAG}))
