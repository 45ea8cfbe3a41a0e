"""`python -m vision_tl.serve`: a model behind HTTP, with dynamic batching.

`scorer` turns uploads into answers on predict's decode path and `Predictor`; `server`
puts it behind FastAPI and uvicorn, one process; `page` is the drop-an-image page at `/`.
The web stack is the optional extra `serve` (`pip install 'vision_tl[serve]'`, in `dev`).
"""

from __future__ import annotations

from omegaconf import DictConfig

from vision_tl.core.errors import ConfigError

# The packages of the `serve` extra that `server` imports.
SERVE_EXTRA = ("fastapi", "starlette", "uvicorn", "multipart", "python_multipart")


def run_serve(cfg: DictConfig) -> None:
    """Serve the configured model until stopped; a missing `serve` extra is one line."""
    try:
        from vision_tl.inference.serving.server import serve_forever
    except ModuleNotFoundError as err:
        if (err.name or "").split(".")[0] not in SERVE_EXTRA:
            raise
        raise ConfigError(
            f"serve needs {err.name}, which is not installed: pip install 'vision_tl[serve]'"
        ) from None
    serve_forever(cfg)
