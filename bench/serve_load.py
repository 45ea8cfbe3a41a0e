"""Load test: `python -m vision_tl.serve` against a one-request-at-a-time FastAPI baseline.

    .venv/bin/python bench/serve_load.py --ckpt CKPT [--images DIR] [--requests 500]
        [--clients 16] [--max-batch-size 16] [--batch-timeout-ms 5] [--rounds 2]
        [--client raw|httpx]

Both sides run on loopback with the same checkpoint, decode path and model, each built by
`build_scorer` (the precision, BatchNorm folding and calibration `predict` uses):

- `serve`: the command as a user starts it: dynamic batching (`serve.max_batch_size`,
  `serve.batch_timeout_ms`), decoding in a thread pool, the model in its own thread;
- `baseline`: a FastAPI app under uvicorn in one process whose `async` handler reads the
  upload as `serve` does, then decodes it and runs the model on it alone, in the event
  loop: one request at a time, no batching.

Each side runs alone (its server started, warmed up with 2 x `--clients` requests, measured,
stopped), in ABBA order over `--rounds`, so drifting background load hits both alike. The
same `--requests` requests (multipart `file=` uploads of the images, in order, cycling)
come from `--clients` concurrent clients, each on one keep-alive connection: `--client raw`
(default) sends prepared HTTP/1.1 requests on asyncio streams and reads each answer (status,
Content-Length, JSON), about 0.2-0.3 ms of CPU a request, so that on a small machine the
load generator takes little of the cores the servers are measured on; `--client httpx`
runs httpx clients in threads (about 2 ms a request). Latency is send to full answer;
images/s is requests over the wall time of the whole batch; `lost` counts requests without
a 200 answer and one prediction. Prints one JSON document; per side the median over
rounds; `speedup` is serve's images/s over the baseline's (target >= 1.5 with nothing
lost).

    .venv/bin/python bench/serve_load.py --baseline-server --ckpt CKPT --port PORT

runs the baseline server alone (what the bench starts as a subprocess).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import uvicorn
from common import HYMENOPTERA, emit
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse

from vision_tl.core.io import write_text
from vision_tl.inference.serving.scorer import build_scorer
from vision_tl.inference.serving.server import read_uploads

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# --------------------------------------------------------------------------- the baseline


def baseline_server(ckpt: str, port: int) -> None:
    """A FastAPI app that scores each request alone, in its event loop."""
    scorer = build_scorer({"ckpt_path": ckpt, "serve": {"max_batch_size": 1}})
    app = FastAPI()

    @app.post("/predict")
    async def predict(request: Request) -> JSONResponse:
        [(name, data)] = await read_uploads(request, scorer.limits.max_file_bytes, 1)
        probs = scorer.rows([scorer.decode(data)]).numpy()
        return JSONResponse({"predictions": [a.to_dict() for a in scorer.answers([name], probs)]})

    @app.get("/health")
    async def health() -> PlainTextResponse:
        return PlainTextResponse("ok")

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)


# --------------------------------------------------------------------------- the load


def summary(latencies: list[float], lost: list[str], requests: int, wall: float) -> dict:
    ms = np.array(latencies) * 1000
    return {
        "requests": requests,
        "answered": len(latencies),
        "lost": len(lost),
        "lost_examples": lost[:3],
        "seconds": round(wall, 2),
        "images_per_s": round(len(latencies) / wall, 1),
        "latency_ms": {
            p: round(float(np.percentile(ms, q)), 1) if len(ms) else None
            for p, q in (("p50", 50), ("p95", 95), ("p99", 99))
        },
    }


def load_httpx(url: str, images: list[tuple[str, bytes]], requests: int, clients: int) -> dict:
    """`requests` uploads from `clients` httpx clients in threads."""
    order = itertools.count()
    lock = threading.Lock()
    latencies: list[float] = []
    lost: list[str] = []

    def client() -> None:
        with httpx.Client(base_url=url, timeout=120) as session:
            while True:
                with lock:
                    index = next(order)
                if index >= requests:
                    return
                name, data = images[index % len(images)]
                start = time.perf_counter()
                try:
                    response = session.post("/predict", files={"file": (name, data, "image/jpeg")})
                    ok = response.status_code == 200 and len(response.json()["predictions"]) == 1
                    reason = f"{response.status_code}: {response.text[:200]}"
                except httpx.HTTPError as err:
                    ok, reason = False, repr(err)
                elapsed = time.perf_counter() - start
                with lock:
                    (latencies.append(elapsed) if ok else lost.append(reason))

    threads = [threading.Thread(target=client) for _ in range(clients)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return summary(latencies, lost, requests, time.perf_counter() - start)


BOUNDARY = "vision-tl-bench-7f3a"


def multipart_request(port: int, name: str, data: bytes) -> bytes:
    """One `POST /predict` with a multipart `file=` field, as bytes on the wire."""
    body = b"".join(
        [
            f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; '
            f'filename="{name}"\r\nContent-Type: image/jpeg\r\n\r\n'.encode(),
            data,
            f"\r\n--{BOUNDARY}--\r\n".encode(),
        ]
    )
    head = (
        f"POST /predict HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"Content-Type: multipart/form-data; boundary={BOUNDARY}\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


async def answer(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """One HTTP/1.1 response: its status and body (the servers send Content-Length)."""
    head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
    length = 0
    for line in head[1:]:
        key, _, value = line.partition(":")
        if key.strip().lower() == "content-length":
            length = int(value)
    return int(head[0].split()[1]), await reader.readexactly(length)


def load_raw(url: str, images: list[tuple[str, bytes]], requests: int, clients: int) -> dict:
    """`requests` uploads from `clients` asyncio connections, requests prepared up front."""
    port = int(url.rsplit(":", 1)[1])
    prepared = [multipart_request(port, name, data) for name, data in images]
    latencies: list[float] = []
    lost: list[str] = []

    async def client(order: Iterator[int]) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            for index in order:
                start = time.perf_counter()
                try:
                    writer.write(prepared[index % len(prepared)])
                    status, body = await answer(reader)
                    ok = status == 200 and len(json.loads(body)["predictions"]) == 1
                    reason = f"{status}: {body[:200]!r}"
                except (OSError, asyncio.IncompleteReadError, ValueError) as err:
                    ok, reason = False, repr(err)
                (latencies.append(time.perf_counter() - start) if ok else lost.append(reason))
        finally:
            writer.close()

    async def run() -> float:
        order = iter(range(requests))
        start = time.perf_counter()
        await asyncio.gather(*(client(order) for _ in range(clients)))
        return time.perf_counter() - start

    return summary(latencies, lost, requests, asyncio.run(run()))


LOADS = {"raw": load_raw, "httpx": load_httpx}


class Server:
    """A server subprocess on a free port, in a session of its own; stopped on exit."""

    def __init__(self, args: list[str], log: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log.open("w")
        self.process = subprocess.Popen(
            [a.replace("{port}", str(self.port)) for a in args],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            cwd=log.parent,
        )
        deadline = time.monotonic() + 300
        while True:
            if self.process.poll() is not None:
                raise SystemExit(f"the server stopped; see {log}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise SystemExit(f"the server did not start in 300 s; see {log}")
            time.sleep(0.25)

    def stop(self) -> None:
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self.log.close()


def run_side(side: str, args: argparse.Namespace, images: list, out: Path, round_: int) -> dict:
    python = [sys.executable]
    if side == "serve":
        command = [
            *python,
            "-m",
            "vision_tl.serve",
            f"ckpt_path={args.ckpt}",
            "serve.port={port}",
            f"serve.max_batch_size={args.max_batch_size}",
            f"serve.batch_timeout_ms={args.batch_timeout_ms}",
            f"hydra.run.dir={out / f'serve_run{round_}'}",
        ]
    else:
        script = str(Path(__file__).resolve())
        command = [*python, script, "--baseline-server", "--ckpt", args.ckpt, "--port", "{port}"]
    server = Server(command, out / f"{side}{round_}.log")
    try:
        info = httpx.get(f"{server.url}/info", timeout=10).json() if side == "serve" else {}
        load = LOADS[args.client]
        load(server.url, images, 2 * args.clients, args.clients)  # warm-up
        result = load(server.url, images, args.requests, args.clients)
        if info:
            result["precision"] = info["model"]["precision"]
        return result
    finally:
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", required=True)
    parser.add_argument("--images", type=Path, default=HYMENOPTERA / "val")
    parser.add_argument("--requests", type=int, default=500)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--max-batch-size", type=int, default=16)
    parser.add_argument("--batch-timeout-ms", type=float, default=5)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--client", choices=sorted(LOADS), default="raw")
    parser.add_argument("--out", type=Path, default=Path("outputs/bench_serve_load"))
    parser.add_argument("--baseline-server", action="store_true")
    parser.add_argument("--port", type=int)
    args = parser.parse_args()
    if args.baseline_server:
        baseline_server(args.ckpt, args.port)
        return
    args.ckpt = str(Path(args.ckpt).resolve())
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    files = sorted(p for p in args.images.rglob("*.jpg"))
    images = [(p.name, p.read_bytes()) for p in files]
    runs: dict[str, list[dict[str, Any]]] = {"baseline": [], "serve": []}
    for round_ in range(args.rounds):
        order = ("baseline", "serve") if round_ % 2 == 0 else ("serve", "baseline")
        for side in order:
            runs[side].append(run_side(side, args, images, out, round_))
            write_text(out / "progress.json", json.dumps(runs, indent=2))

    def median(side: str) -> dict[str, Any]:
        rounds = runs[side]
        return {
            "images_per_s": statistics.median(r["images_per_s"] for r in rounds),
            "latency_ms": {
                p: statistics.median(r["latency_ms"][p] for r in rounds)
                for p in ("p50", "p95", "p99")
            },
            "lost": sum(r["lost"] for r in rounds),
            "rounds": rounds,
        }

    serve, baseline = median("serve"), median("baseline")
    emit(
        "serve_load",
        {
            "ckpt": args.ckpt,
            "images": f"{len(images)} files from {args.images}",
            "requests": args.requests,
            "clients": args.clients,
            "client": args.client,
            "max_batch_size": args.max_batch_size,
            "batch_timeout_ms": args.batch_timeout_ms,
            "serve": serve,
            "baseline": baseline,
            "speedup": round(serve["images_per_s"] / baseline["images_per_s"], 2),
        },
    )


if __name__ == "__main__":
    main()
