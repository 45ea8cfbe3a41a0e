"""Run by every Python process the test suite starts (this folder is on its PYTHONPATH)."""

import os

if os.environ.get("VISION_TL_TEST_OFFLINE") == "1":
    import network_guard

    network_guard.install()
