"""`serve_forever(cfg)`: a checkpoint behind HTTP on LitServe (the worker of `python -m
vision_tl.serve`).

Two processes share the work. LitServe's inference worker (spawned) builds its own
scorer and runs the model on dynamic batches: up to `serve.max_batch_size` images, waiting
at most `serve.batch_timeout_ms` for them. The HTTP process (forked from this one) reads
each upload, refuses bad input with a 4xx and a one-line reason, and decodes the images in
a thread pool, so decoding never runs on the model's process and the two overlap. Each
image is one item of LitServe's queue: a batch mixes images of several requests, and a
request of several images is answered when all of them are scored.

Where LitServe does not fit, and what is used instead (docs/design.md):
- `LitAPI.decode_request` runs in the model's process, one request after another, and an
  exception there fails every request of the batch; LitServe's default endpoint takes
  JSON or forms only. A `LitSpec` owns its endpoint, so `POST /predict` is this module's
  `UploadSpec.predict_endpoint`, a FastAPI handler that sees the raw request.
- LitServe answers `GET /` itself ("litserve running"): the page is served by a small
  ASGI middleware in front of it. `GET /health` and `GET /info` are LitServe's own
  (`/info` shows the scorer's description as its `model`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import litserve
import numpy as np
from fastapi import HTTPException
from fastapi.responses import JSONResponse
from litserve.specs.base import LitSpec
from litserve.utils import LitAPIStatus, ResponseBufferItem
from omegaconf import DictConfig, OmegaConf
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response

from vision_tl.core.runtime import available_cpus, resolve_device
from vision_tl.core.signals import SIGNALS, Interrupted
from vision_tl.inference.serving.page import PAGE
from vision_tl.inference.serving.scorer import Refused, Scorer, Views, build_scorer

log = logging.getLogger(__name__)

API_PATH = "/predict"
# What a raw body may be sent as; multipart/form-data carries one or more `file` fields.
RAW_TYPES = ("image/", "application/octet-stream")
# The keys of the entry config the model's process needs to build its scorer.
SCORER_KEYS = (
    "ckpt_path",
    "model_path",
    "device",
    "precision",
    "calibrate",
    "tta",
    "top_k",
    "reject_threshold",
    "apply_open_set",
    "unknown_label",
    "data",
    "serve",
)


def scorer_config(cfg: DictConfig) -> dict[str, Any]:
    """The plain values the model's process builds its scorer from (a spawned process
    cannot resolve Hydra's interpolations)."""
    return {k: OmegaConf.to_container(cfg, resolve=True).get(k) for k in SCORER_KEYS}


async def read_uploads(
    request: Request, max_body: int, max_images: int
) -> list[tuple[str | None, bytes]]:
    """The images of a request, as (file name, bytes): the raw body (`image/*`,
    `application/octet-stream`) or each `file` field of a multipart form."""
    length = request.headers.get("content-length")
    if length and length.isdigit() and int(length) > max_body:
        raise HTTPException(413, f"body of {length} bytes > serve.max_body_bytes={max_body}")
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind == "multipart/form-data":
        form = await request.form(max_files=max_images, max_fields=max_images)
        try:
            files = [v for k, v in form.multi_items() if k == "file"]
            if not files or any(isinstance(f, str) for f in files):
                raise HTTPException(
                    400, "the form needs a file field holding the image (curl -F file=@image.jpg)"
                )
            return [(f.filename, await f.read()) for f in files]
        finally:
            await form.close()
    if kind.startswith(RAW_TYPES):
        return [(None, await request.body())]
    raise HTTPException(
        415,
        f"Content-Type {kind or '(none)'}: send multipart/form-data with a file field, or "
        "the image's bytes as image/* or application/octet-stream",
    )


class UploadSpec(LitSpec):
    """`POST /predict` in the HTTP process: read, check and decode the uploads, queue one
    item per image for the model's process, answer when every image is scored."""

    def __init__(self, scorer: Scorer, max_body: int, max_images: int, timeout: float,
                 threads: int) -> None:  # fmt: skip
        super().__init__()
        self.api_path = API_PATH
        self.scorer = scorer
        self.max_body = max_body
        self.max_images = max_images
        self.timeout = timeout
        self.threads = threads
        self.pool: ThreadPoolExecutor | None = None

    def __getstate__(self) -> dict[str, Any]:
        """The model's process gets the spec without the scorer (it builds its own)."""
        state = super().__getstate__()
        state.update(scorer=None, pool=None)
        return state

    def pre_setup(self, lit_api: Any) -> None:
        self.add_endpoint(self.api_path, self.predict_endpoint, ["POST"])

    def decode_request(self, request: Any, context_kwargs: Any = None) -> Any:
        return request

    def encode_response(self, output: Any, context_kwargs: Any = None) -> Any:
        return output

    def decoder(self) -> ThreadPoolExecutor:
        """The decoding threads, made in the HTTP process on its first request (threads do
        not survive the fork that starts it); each runs torch on one core."""
        if self.pool is None:
            import torch

            torch.set_num_threads(1)
            self.pool = ThreadPoolExecutor(self.threads, thread_name_prefix="decode")
        return self.pool

    async def decode_all(self, uploads: list[tuple[str | None, bytes]]) -> list[Views]:
        loop = asyncio.get_running_loop()
        pool = self.decoder()
        jobs = [loop.run_in_executor(pool, self.scorer.decode, data) for _, data in uploads]
        results = await asyncio.gather(*jobs, return_exceptions=True)
        for (name, _), result in zip(uploads, results, strict=True):
            if isinstance(result, Refused):
                where = f"{name}: " if len(uploads) > 1 and name else ""
                raise HTTPException(result.status, f"{where}{result.reason}")
            if isinstance(result, BaseException):
                raise result
        return results  # type: ignore[return-value]

    async def score(self, views: list[Views]) -> np.ndarray:
        """Queue each image for the model's process; its rows (`Scorer.rows`), in order."""
        uids = [str(uuid.uuid4()) for _ in views]
        events = []
        for uid, item in zip(uids, views, strict=True):
            event = asyncio.Event()
            self.response_buffer[uid] = ResponseBufferItem(event=event)
            events.append(event)
            self.request_queue.put((self.response_queue_id, uid, time.monotonic(), item))
        try:
            await asyncio.wait_for(asyncio.gather(*(e.wait() for e in events)), self.timeout)
        except asyncio.TimeoutError:
            raise HTTPException(504, f"not scored within serve.timeout_s={self.timeout}") from None
        finally:
            done = [self.response_buffer.pop(uid, None) for uid in uids]
        rows = []
        for item in done:
            output, status = item.response if item and item.response else (None, None)
            if status != LitAPIStatus.OK:
                raise HTTPException(500, "the model failed on this batch (see the server's log)")
            rows.append(np.asarray(output, dtype=np.float32))
        return np.stack(rows)

    async def predict_endpoint(self, request: Request) -> Response:
        uploads = await read_uploads(request, self.max_body, self.max_images)
        probs = await self.score(await self.decode_all(uploads))
        answers = self.scorer.answers([name for name, _ in uploads], probs)
        return JSONResponse({"predictions": [a.to_dict() for a in answers]})


class PageMiddleware:
    """`GET /`: the drop-an-image page, in front of LitServe's own `/` text."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"] == "/" and scope["method"] in ("GET", "HEAD"):
            await HTMLResponse(PAGE)(scope, receive, send)
            return
        await self.app(scope, receive, send)


class ClassifierAPI(litserve.LitAPI):
    """The model's process: its own scorer (built from `config` in `setup`), and the
    rows (probabilities, and the open-set score) of a batch of decoded images."""

    def __init__(self, config: dict[str, Any], **options: Any) -> None:
        super().__init__(**options)
        self.config = config
        self.scorer: Scorer | None = None

    def setup(self, device: str) -> None:
        self.scorer = build_scorer(self.config)

    def decode_request(self, request: Any, **kwargs: Any) -> Any:
        return request  # decoded in the HTTP process

    def batch(self, inputs: list[Views]) -> list[Views]:
        return list(inputs)

    def predict(self, x: Any, **kwargs: Any) -> Any:
        assert self.scorer is not None, "setup() builds the scorer"
        if self.max_batch_size > 1:
            return self.scorer.rows(x).numpy()
        return self.scorer.rows([x]).numpy()[0]

    def encode_response(self, output: Any, **kwargs: Any) -> Any:
        return output


@contextlib.contextmanager
def stop_as_litserve_expects() -> Iterator[list[int]]:
    """Within: SIGTERM and SIGINT raise KeyboardInterrupt, the one exception on which
    `LitServer.run` shuts down without a last message to its manager, a message that
    hangs when the signal arrived in the middle of another. Yields the signals received."""
    received: list[int] = []
    owner = os.getpid()

    def stop(signum: int, frame: object) -> None:
        if os.getpid() != owner:  # a forked child (LitServe's manager): the default action
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        received.append(signum)
        raise KeyboardInterrupt

    previous = {signum: signal.signal(signum, stop) for signum in SIGNALS}
    try:
        yield received
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def serve_forever(cfg: DictConfig) -> None:
    """Serve `ckpt_path` until stopped (Ctrl+C, SIGTERM)."""
    serve = cfg.serve
    scorer = build_scorer(cfg)  # a bad checkpoint or value fails here, in one line
    threads = int(serve.decode_threads or available_cpus())
    spec = UploadSpec(
        scorer, int(serve.max_body_bytes), int(serve.max_images), float(serve.timeout_s), threads
    )
    api = ClassifierAPI(
        scorer_config(cfg),
        max_batch_size=int(serve.max_batch_size),
        batch_timeout=float(serve.batch_timeout_ms) / 1000,
        api_path=API_PATH,
        spec=spec,
    )
    device = resolve_device(cfg.get("device", "auto"))
    server = litserve.LitServer(
        api,
        accelerator="cuda" if device.type == "cuda" else "cpu",
        devices=1,
        workers_per_device=1,
        timeout=float(serve.timeout_s),
        model_metadata=scorer.info,
        max_payload_size=int(serve.max_body_bytes),
        middlewares=[PageMiddleware],
        # A model process that dies (out of memory) is started again; its requests get 500.
        restart_workers=True,
    )
    log.info(
        "Serving %s (%s) at http://%s:%d: POST %s, GET /health, GET /info, the page at /",
        scorer.info["checkpoint"],
        scorer.info["version"],
        serve.host,
        int(serve.port),
        API_PATH,
    )
    with stop_as_litserve_expects() as received:
        server.run(
            host=str(serve.host),
            port=int(serve.port),
            num_api_servers=1,
            generate_client_file=False,
            log_level=str(serve.log_level),
            access_log=bool(serve.access_log),
        )
    if received:
        raise Interrupted(received[0])
