"""`serve_forever(cfg)`: a model behind HTTP (the worker of `python -m vision_tl.serve`).

One process: FastAPI under uvicorn. Each upload is read and checked in the event loop,
decoded in a thread pool (`serve.decode_threads`), and queued as one image for the
`Batcher`, whose thread runs the model on up to `serve.max_batch_size` queued images at
once, waiting at most `serve.batch_timeout_ms` after the first for the rest. Decoding and
the model overlap on the cores (Pillow, torch and OpenVINO release the GIL), a batch mixes
the images of several requests, and a request of several images is answered when all of
them are scored.

Why not LitServe (docs/design.md, "Serving"): it always runs the model in a worker
process of its own, so each image crosses two process queues; on a 2-core CPU that cost
as much as batching saved (0.97x a one-request-at-a-time server, against 1.5x in one
process, bench/serve_load.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import uvicorn
from fastapi import FastAPI, HTTPException
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse
from omegaconf import DictConfig
from starlette.requests import Request

from vision_tl.core.engines import cores_for
from vision_tl.core.runtime import available_cpus
from vision_tl.inference.serving.page import PAGE
from vision_tl.inference.serving.scorer import Refused, Scorer, Views, build_scorer

log = logging.getLogger(__name__)

API_PATH = "/predict"
# What a raw body may be sent as; multipart/form-data carries one or more `file` fields.
RAW_TYPES = ("image/", "application/octet-stream")


def capped(request: Request, max_body: int) -> Request:
    """`request` whose body reads fail with 413 past `max_body` bytes (a chunked body has
    no Content-Length to refuse it by)."""
    seen = 0

    async def receive() -> dict[str, Any]:
        nonlocal seen
        message = await request.receive()
        seen += len(message.get("body", b""))
        if seen > max_body:
            raise HTTPException(413, f"body over serve.max_body_bytes={max_body}")
        return message

    return Request(request.scope, receive)


async def read_uploads(
    request: Request, max_body: int, max_images: int
) -> list[tuple[str | None, bytes]]:
    """The images of a request, as (file name, bytes): the raw body (`image/*`,
    `application/octet-stream`) or each `file` field of a multipart form."""
    length = request.headers.get("content-length")
    if length and length.isdigit() and int(length) > max_body:
        raise HTTPException(413, f"body of {length} bytes > serve.max_body_bytes={max_body}")
    request = capped(request, max_body)
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


class Batcher:
    """Dynamic batching: callers queue images (`await batcher(views)`), and one thread runs
    `score` on up to `max_size` of them at once, waiting at most `wait_s` after the first
    for the rest. A failing batch fails only its own images; the thread goes on."""

    def __init__(
        self, score: Callable[[list[Views]], np.ndarray], max_size: int, wait_s: float
    ) -> None:
        self.score = score
        self.max_size = int(max_size)
        self.wait_s = float(wait_s)
        self.jobs: queue.SimpleQueue[tuple[Views, asyncio.Future] | None] = queue.SimpleQueue()
        self.thread = threading.Thread(target=self.run, name="model", daemon=True)
        self.batches = 0
        self.images = 0

    def __enter__(self) -> Batcher:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        """Let the thread finish the batch it is in, then end."""
        self.jobs.put(None)
        self.thread.join()

    async def __call__(self, views: Sequence[Views], timeout: float) -> np.ndarray:
        """The rows (`Scorer.rows`) of `views`, in order; 504 past `timeout` seconds."""
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in views]
        for item, future in zip(views, futures, strict=True):
            self.jobs.put((item, future))
        try:
            rows = await asyncio.wait_for(asyncio.gather(*futures), timeout)
        except asyncio.TimeoutError:  # TimeoutError itself from Python 3.11 on
            raise HTTPException(504, f"not scored within serve.timeout_s={timeout}") from None
        return np.stack(rows)

    def take(self) -> list[tuple[Views, asyncio.Future]] | None:
        """The next batch (None: stop): the first job, and those that arrive within
        `wait_s` of it, up to `max_size`. Jobs whose request gave up are dropped."""
        first = self.jobs.get()
        if first is None:
            return None
        batch = [first]
        deadline = time.monotonic() + self.wait_s
        while len(batch) < self.max_size:
            left = deadline - time.monotonic()
            try:
                job = self.jobs.get(timeout=left) if left > 0 else self.jobs.get_nowait()
            except queue.Empty:
                break
            if job is None:
                self.jobs.put(None)  # stop after this batch
                break
            batch.append(job)
        return [job for job in batch if not job[1].done()]

    def run(self) -> None:
        while (batch := self.take()) is not None:
            if not batch:
                continue
            try:
                rows: Any = self.score([views for views, _ in batch])
                if len(rows) != len(batch):
                    raise RuntimeError(f"{len(rows)} rows for {len(batch)} images")
                results = [(row, None) for row in rows]
            except Exception as err:  # the batch's requests get 500; the server stays up
                log.exception("the model failed on a batch of %d image(s)", len(batch))
                why = f"the model failed on this batch ({type(err).__name__}; see the server's log)"
                results = [(None, HTTPException(500, why))] * len(batch)
            self.batches += 1
            self.images += len(batch)
            for (_, future), (row, error) in zip(batch, results, strict=True):
                with contextlib.suppress(RuntimeError):  # its event loop has closed
                    future.get_loop().call_soon_threadsafe(settle, future, row, error)


def settle(future: asyncio.Future, row: Any, error: BaseException | None) -> None:
    """Hand a row (or the batch's error) to a request still waiting for it."""
    if future.done():  # the request timed out or its client went away
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(row)


class Decoder:
    """The decoding threads: each upload's views (`Scorer.decode`), or its 4xx."""

    def __init__(self, scorer: Scorer, threads: int) -> None:
        self.scorer = scorer
        self.threads = int(threads)
        self.pool = ThreadPoolExecutor(self.threads, thread_name_prefix="decode")

    def __enter__(self) -> Decoder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)

    async def __call__(self, uploads: list[tuple[str | None, bytes]]) -> list[Views]:
        loop = asyncio.get_running_loop()
        jobs = [loop.run_in_executor(self.pool, self.scorer.decode, data) for _, data in uploads]
        results = await asyncio.gather(*jobs, return_exceptions=True)
        for (name, _), result in zip(uploads, results, strict=True):
            if isinstance(result, Refused):
                where = f"{name}: " if len(uploads) > 1 and name else ""
                raise HTTPException(result.status, f"{where}{result.reason}")
            if isinstance(result, BaseException):
                raise result
        return results  # type: ignore[return-value]


def build_app(scorer: Scorer, serve: DictConfig, batcher: Batcher, decoder: Decoder) -> FastAPI:
    """`POST /predict`, `GET /health`, `GET /info` and the page at `/`."""
    max_body, max_images = int(serve.max_body_bytes), int(serve.max_images)
    timeout = float(serve.timeout_s)
    server_info = {
        "max_batch_size": batcher.max_size,
        "batch_timeout_ms": batcher.wait_s * 1000,
        "decode_threads": decoder.threads,
        "timeout_s": timeout,
    }
    app = FastAPI(title="vision_tl", docs_url=None, redoc_url=None, openapi_url=None)

    @app.post(API_PATH)
    async def predict(request: Request) -> JSONResponse:
        uploads = await read_uploads(request, max_body, max_images)
        rows = await batcher(await decoder(uploads), timeout)
        answers = scorer.answers([name for name, _ in uploads], rows)
        return JSONResponse({"predictions": [a.to_dict() for a in answers]})

    @app.get("/health")
    async def health() -> PlainTextResponse:
        return PlainTextResponse("ok")

    @app.get("/info")
    async def info() -> JSONResponse:
        served = {**server_info, "batches": batcher.batches, "images": batcher.images}
        return JSONResponse({"model": scorer.info, "server": served})

    @app.api_route("/", methods=["GET", "HEAD"])
    async def page() -> HTMLResponse:
        return HTMLResponse(PAGE)

    return app


def serve_forever(cfg: DictConfig) -> None:
    """Serve `ckpt_path` (or `model_path`) until stopped (Ctrl+C, SIGTERM: uvicorn answers
    the requests in flight, then the signal is reported as every command reports it)."""
    serve = cfg.serve
    scorer = build_scorer(cfg)  # a bad checkpoint or value fails here, in one line
    wait_s = float(serve.batch_timeout_ms) / 1000
    threads = int(serve.decode_threads or available_cpus())
    # torch on one thread for the whole process when another engine runs the network:
    # the decoding threads' small ops then never spin on the cores the engine needs. The
    # threads stop after uvicorn has answered the requests in flight.
    with (
        cores_for(scorer.predictor.runner),
        Batcher(scorer.rows, int(serve.max_batch_size), wait_s) as batcher,
        Decoder(scorer, threads) as decoder,
    ):
        app = build_app(scorer, serve, batcher, decoder)
        log.info(
            "Serving %s (%s) at http://%s:%d: POST %s, GET /health, GET /info, the page at /",
            scorer.info.get("checkpoint") or scorer.info.get("model"),
            scorer.info["version"],
            serve.host,
            int(serve.port),
            API_PATH,
        )
        uvicorn.run(
            app,
            host=str(serve.host),
            port=int(serve.port),
            log_level=str(serve.log_level),
            access_log=bool(serve.access_log),
        )
