"""serve: the real server (`python -m vision_tl.serve` on a free loopback port) answers real
HTTP requests (httpx) as `python -m vision_tl.predict` answers for the same images, refuses
bad input with a 4xx and a one-line reason without going down, and its page works in
headless Chromium."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import os
import shutil
import signal
import struct
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
import pytest
from conftest import QUICK_TRAIN, make_image_folder, run_cli
from helpers.net import free_port
from hydra import compose, initialize_config_dir
from PIL import Image

from vision_tl.core.cli import check_command_line
from vision_tl.core.config import config_dir
from vision_tl.core.errors import ConfigError
from vision_tl.inference.predict import run_predict
from vision_tl.inference.serving.scorer import build_scorer
from vision_tl.inference.serving.server import Batcher
from vision_tl.training.train import run_training

CLASSES = ["cat", "dog", "fox"]
# A 1 MB checkpoint: quick to load.
TRAIN = [*QUICK_TRAIN, "model.backbone.name=timm/test_efficientnet", "finetune=full"]
# Small limits, so that the bad inputs stay small.
MAX_BODY = 300_000
MAX_PIXELS = 1_000_000
CHROMIUM = pytest.mark.skipif(
    shutil.which("chromium") is None and os.environ.get("CI") != "true",
    reason="needs Debian's chromium (.ci/run installs it; under CI=true a missing one fails)",
)


def compose_entry(name: str, overrides: list[str], output_dir: Path):
    with initialize_config_dir(version_base="1.3", config_dir=str(config_dir())):
        return compose(name, overrides=[*overrides, f"paths.output_dir={output_dir}"])


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("data"), splits=("train", "val", "test"))


@pytest.fixture(scope="module")
def ckpt(data_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("run")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VISION_TL_CACHE", str(out / "cache"))
        run_training(compose_entry("train", [*TRAIN, f"data.root={data_root}"], out))
    return out / "checkpoints" / "best.ckpt"


@pytest.fixture(scope="module")
def good(data_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Nine PNGs and two JPEGs (one large enough for draft decoding), in one folder."""
    folder = tmp_path_factory.mktemp("good")
    for name in CLASSES:
        for i in range(3):
            shutil.copy(data_root / "test" / name / f"{name}_{i}.png", folder / f"{name}_{i}.png")
    with Image.open(folder / "dog_1.png") as image:
        image.convert("RGB").save(folder / "dog_small.jpg", quality=90)
        image.convert("RGB").resize((200, 160)).save(folder / "dog_large.jpg", quality=90)
    return folder


@pytest.fixture(scope="module")
def threshold(ckpt: Path, good: Path, tmp_path_factory: pytest.TempPathFactory) -> float:
    """A rejection threshold between the confidences, so some answers are `unknown`."""
    out = tmp_path_factory.mktemp("confidences")
    frame = run_predict(compose_entry("predict", [f"ckpt_path={ckpt}", f"input={good}"], out))
    confidence = np.sort(frame.confidence.to_numpy())
    middle = len(confidence) // 2
    assert confidence[middle] > confidence[middle - 1], "the tiny model gives ties"
    return float((confidence[middle] + confidence[middle - 1]) / 2)


@contextlib.contextmanager
def serving(
    args: list[str], base: Path, before: Callable[[], None] = lambda: None
) -> Iterator[str]:
    """`python -m vision_tl.serve ARGS` on a free port (`before` runs while it starts); its
    URL once `/health` answers. Stopped with SIGTERM: it must exit 143 and say so."""
    port = free_port()
    log_path = base / f"serve-{port}.log"
    with log_path.open("w") as log:
        server = subprocess.Popen(
            [sys.executable, "-m", "vision_tl.serve", *args, f"serve.port={port}"],
            cwd=base,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        url = f"http://127.0.0.1:{port}"
        try:
            before()
            deadline = time.monotonic() + 120
            while True:
                assert server.poll() is None, log_path.read_text()[-3000:]
                try:
                    if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert time.monotonic() < deadline, log_path.read_text()[-3000:]
                time.sleep(0.2)
            yield url
            os.kill(server.pid, signal.SIGTERM)
            assert server.wait(30) == 128 + signal.SIGTERM
            assert "interrupted by SIGTERM" in log_path.read_text()
        finally:
            if server.poll() is None:
                os.killpg(server.pid, signal.SIGKILL)
                server.wait()


@pytest.fixture(scope="module")
def started(
    ckpt: Path, good: Path, threshold: float, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, pd.DataFrame]]:
    """The server, and `python -m vision_tl.predict`'s rows for the good images (run
    while the server starts); the server is stopped with SIGTERM at the end."""
    base = tmp_path_factory.mktemp("serve")
    args = [
        f"ckpt_path={ckpt}",
        "serve.max_batch_size=4",
        "serve.batch_timeout_ms=20",
        f"serve.max_body_bytes={MAX_BODY}",
        "serve.max_images=4",
        f"data.max_image_pixels={MAX_PIXELS}",
        f"reject_threshold={threshold}",
        f"hydra.run.dir={base / 'run'}",
    ]

    def predict() -> None:
        done = run_cli(
            [
                "vision_tl.predict",
                f"ckpt_path={ckpt}",
                f"input={good}",
                f"reject_threshold={threshold}",
                f"hydra.run.dir={base / 'predict'}",
                "progress=false",
            ],
            base,
        )
        assert done.returncode == 0, done.stderr[-3000:]

    with serving(args, base, predict) as url:
        yield url, pd.read_csv(base / "predict" / "predictions.csv").set_index("path")


# --------------------------------------------------------------------------- bad input


def png(width: int, height: int, colour: tuple[int, int, int] = (200, 40, 40)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), colour).save(buffer, format="PNG")
    return buffer.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A decompression bomb's front: a PNG that says it is `width` x `height` pixels."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # 1-bit grey
    idat = zlib.compress(b"\0" * 64)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")
    )


def truncated_jpeg() -> bytes:
    buffer = io.BytesIO()
    noise = np.random.default_rng(0).integers(0, 255, (96, 96, 3), dtype=np.uint8)
    Image.fromarray(noise).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()[: len(buffer.getvalue()) // 2]


BAD = {
    # name: (content type, body, status, words in the reason)
    "not an image": ("image/jpeg", b"hello, I am text", 422, "not an image"),
    "truncated jpeg": ("image/jpeg", truncated_jpeg(), 422, "truncated"),
    "1x1 image": ("image/png", png(1, 1), 422, "serve.min_side=16"),
    "too many pixels": ("image/png", png(1100, 1000), 413, "max_image_pixels"),
    "decompression bomb": ("image/png", png_header_only(40_000, 40_000), 413, "too large"),
    "body over the limit": ("image/png", b"\0" * (MAX_BODY + 1), 413, "serve.max_body_bytes"),
    "json": ("application/json", b'{"image": "x.jpg"}', 415, "Content-Type application/json"),
    "no content type": ("", png(32, 32), 415, "Content-Type (none)"),
    "empty body": ("image/png", b"", 400, "empty body"),
}


@pytest.mark.integration
def test_bad_input_gets_a_4xx_with_one_line_and_the_server_stays_up(started) -> None:
    url, _ = started
    with httpx.Client(base_url=url, timeout=30) as client:
        for name, (kind, body, status, words) in BAD.items():
            headers = {"content-type": kind} if kind else {}
            response = client.post("/predict", content=body, headers=headers)
            assert response.status_code == status, (name, response.text)
            reason = response.json()["detail"]
            assert words in reason and "\n" not in reason, (name, reason)
        no_file = client.post("/predict", files={"image": ("a.png", png(32, 32), "image/png")})
        assert no_file.status_code == 400 and "file field" in no_file.json()["detail"]
        too_many = [("file", (f"{i}.png", png(32, 32), "image/png")) for i in range(5)]
        response = client.post("/predict", files=too_many)
        assert response.status_code == 400, response.text
        one_bad = [
            ("file", ("fine.png", png(32, 32), "image/png")),
            ("file", ("broken.jpg", truncated_jpeg(), "image/jpeg")),
        ]
        response = client.post("/predict", files=one_bad)
        assert response.status_code == 422 and response.json()["detail"].startswith("broken.jpg:")
        assert client.get("/health").text == "ok"
        assert client.post("/predict", content=png(32, 32), headers={"content-type": "image/png"})
        assert client.head("/").status_code == 200

        def chunked() -> Iterator[bytes]:  # no Content-Length: refused as it streams in
            for _ in range(4):
                yield b"\0" * (MAX_BODY // 2)

        response = client.post("/predict", content=chunked(), headers={"content-type": "image/png"})
        assert response.status_code == 413 and "serve.max_body_bytes" in response.text


# --------------------------------------------------------------------------- answers


def check_answer(answer: dict, row: pd.Series, top_k: int = 3) -> None:
    """One server answer against predict's row for the same image."""
    assert answer["label"] == row.label
    assert answer["unknown"] == (row.label == "unknown")
    assert answer["confidence"] == pytest.approx(row.confidence, abs=1e-5)
    for j, top in enumerate(answer["top_k"], start=1):
        assert top["label"] == row[f"top{j}_label"]
        assert top["prob"] == pytest.approx(row[f"top{j}_prob"], abs=1e-5)
    assert len(answer["top_k"]) == top_k
    for name in CLASSES:
        assert answer["probs"][name] == pytest.approx(row[f"prob_{name}"], abs=1e-5)


@pytest.mark.integration
def test_answers_equal_predict_one_several_and_concurrent(started, good: Path) -> None:
    url, expected = started
    assert {"unknown"} < set(expected.label), "the threshold rejects some images"
    assert (expected.label != "unknown").any(), "and keeps others"
    names = sorted(expected.index)
    with httpx.Client(base_url=url, timeout=60) as client:
        raw = client.post(
            "/predict",
            content=(good / "dog_large.jpg").read_bytes(),
            headers={"content-type": "image/jpeg"},
        )
        assert raw.status_code == 200, raw.text
        [answer] = raw.json()["predictions"]
        assert answer["name"] is None
        check_answer(answer, expected.loc["dog_large.jpg"])

        several = [("file", (n, (good / n).read_bytes(), "image/png")) for n in names[:4]]
        response = client.post("/predict", files=several)
        assert response.status_code == 200, response.text
        answers = response.json()["predictions"]
        assert [a["name"] for a in answers] == names[:4]
        for a in answers:
            check_answer(a, expected.loc[a["name"]])

        info = client.get("/info").json()["model"]
        assert info["classes"] == CLASSES and info["precision"] in ("fp32", "bf16")
        assert info["version"].startswith("sha256:") and info["preprocessing"]["input_size"] == 32

    def one(name: str) -> tuple[str, httpx.Response]:
        files = {"file": (name, (good / name).read_bytes(), "application/octet-stream")}
        return name, httpx.post(f"{url}/predict", files=files, timeout=60)

    # Concurrent clients: batches mix their images, and each gets its own answers.
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(one, names * 2))
    for name, response in results:
        assert response.status_code == 200, response.text
        [answer] = response.json()["predictions"]
        assert answer["name"] == name
        check_answer(answer, expected.loc[name])


@pytest.mark.integration
@CHROMIUM
def test_page_answers_a_dropped_image_in_headless_chromium(started, good: Path) -> None:
    """A person drops an image on the page at / and reads the answer; a dropped text file
    shows the server's one-line reason."""
    from helpers.browser import Browser

    url, expected = started
    drop = """(async () => {
      const bytes = Uint8Array.from(atob("%s"), (c) => c.charCodeAt(0));
      const file = new File([bytes], "%s", {type: "%s"});
      const data = new DataTransfer();
      data.items.add(file);
      document.getElementById("drop").dispatchEvent(
        new DragEvent("drop", {dataTransfer: data, bubbles: true, cancelable: true}));
      for (let i = 0; i < 400; i++) {
        const shown = document.getElementById("label") || document.getElementById("error");
        if (shown) return {
          id: shown.id, text: shown.textContent,
          rows: [...document.querySelectorAll("#top tr")].map((r) => r.cells[0].textContent),
          model: document.getElementById("model").textContent,
          preview: document.getElementById("preview").naturalWidth,
        };
        await new Promise((r) => setTimeout(r, 50));
      }
      return null;
    })()"""
    image = base64.b64encode((good / "fox_0.png").read_bytes()).decode()
    with Browser() as browser:
        page = browser.open(f"{url}/")
        seen = browser.evaluate(page, drop % (image, "fox_0.png", "image/png"))
        assert seen is not None, "no answer appeared"
        row = expected.loc["fox_0.png"]
        assert seen["id"] == "label" and seen["text"].startswith(row.label)
        assert seen["rows"] == [row.top1_label, row.top2_label, row.top3_label]
        assert "cat, dog, fox" in seen["model"] and seen["preview"] > 0
        text = base64.b64encode(b"not an image at all").decode()
        page = browser.open(f"{url}/")
        seen = browser.evaluate(page, drop % (text, "notes.txt", "text/plain"))
        assert seen is not None and seen["id"] == "error", seen
        assert seen["text"].startswith("422: not an image")


# --------------------------------------------------------------------------- batching


class Model:
    """A model for the batcher: each image's row is its id (the array's first value) times
    ten; it records each batch's ids, fails a batch holding `poison`, and is `slow` on one
    holding `sleepy`."""

    def __init__(self, poison: int = -1, sleepy: int = -1) -> None:
        self.batches: list[list[int]] = []
        self.poison, self.sleepy = poison, sleepy
        self.threads: set[str] = set()

    def __call__(self, views: list[np.ndarray]) -> np.ndarray:
        ids = [int(v[0]) for v in views]
        self.batches.append(ids)
        self.threads.add(threading.current_thread().name)
        if self.poison in ids:
            raise RuntimeError("out of memory, say")
        if self.sleepy in ids:
            time.sleep(0.5)
        return np.array([[10.0 * i] for i in ids])


def image(i: int) -> np.ndarray:
    return np.array([i], dtype=np.uint8)


async def requests(batcher: Batcher, groups: list[list[int]], timeout: float = 10) -> list:
    """The groups sent at once, as concurrent requests; each one's rows or its exception."""
    calls = [batcher([image(i) for i in group], timeout) for group in groups]
    return await asyncio.gather(*calls, return_exceptions=True)


@pytest.mark.unit
def test_the_batcher_mixes_requests_up_to_its_size_and_answers_each_its_own_rows() -> None:
    model = Model()
    groups = [[1], [2], [3, 4, 5], [6], [7], [8, 9]]
    with Batcher(model, max_size=4, wait_s=0.2) as batcher:
        results = asyncio.run(requests(batcher, groups))
    for group, rows in zip(groups, results, strict=True):
        assert rows.tolist() == [[10.0 * i] for i in group]
    assert sorted(i for batch in model.batches for i in batch) == list(range(1, 10))
    assert all(len(batch) <= 4 for batch in model.batches)
    assert len(model.batches) == 3, "9 images queued at once fill batches of 4, 4, 1"
    assert model.threads == {"model"} and not batcher.thread.is_alive()
    assert (batcher.batches, batcher.images) == (3, 9)


@pytest.mark.unit
def test_the_batcher_waits_at_most_its_timeout_for_a_full_batch() -> None:
    model = Model()
    with Batcher(model, max_size=16, wait_s=0.05) as batcher:
        start = time.perf_counter()
        [rows] = asyncio.run(requests(batcher, [[3]]))
        waited = time.perf_counter() - start
    assert rows.tolist() == [[30.0]] and model.batches == [[3]]
    assert 0.05 <= waited < 2, "one image waits out batch_timeout, then runs alone"


@pytest.mark.unit
def test_a_failing_batch_fails_its_requests_only_and_a_slow_one_times_out() -> None:
    from fastapi import HTTPException

    model = Model(poison=2, sleepy=7)

    async def scenario(batcher: Batcher) -> tuple[list, list, list]:
        failed = await requests(batcher, [[1, 2]])
        slow = await requests(batcher, [[7]], timeout=0.1)
        after = await requests(batcher, [[3], [4]])
        return failed, slow, after

    with Batcher(model, max_size=2, wait_s=0.01) as batcher:
        failed, slow, after = asyncio.run(scenario(batcher))
    [error] = failed
    assert isinstance(error, HTTPException) and error.status_code == 500
    assert "RuntimeError" in error.detail and "\n" not in error.detail
    [late] = slow
    assert isinstance(late, HTTPException) and late.status_code == 504
    assert "serve.timeout_s=0.1" in late.detail
    assert [r.tolist() for r in after] == [[[30.0]], [[40.0]]], "the thread went on"


# --------------------------------------------------------------------------- config


def test_serve_options_are_checked_before_any_work() -> None:
    for override, words in [
        ("serve.port=80", "serve.port=80: an integer from 1024 to 65535"),
        ("serve.max_batch_size=0", "serve.max_batch_size=0: a positive integer"),
        ("serve.host=example.org", "serve.host=example.org: one of 127.0.0.1, 0.0.0.0, ::"),
        ("serve.batch_timeout_ms=-1", "serve.batch_timeout_ms=-1: a number >= 0"),
    ]:
        with pytest.raises(ConfigError, match="^" + words.replace(".", r"\.")):
            check_command_line("serve", ["ckpt_path=x.ckpt", override])


def test_model_path_and_missing_checkpoint_are_one_line_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"no model\.json \(not an export folder\)"):
        build_scorer({"model_path": str(tmp_path)})
    with pytest.raises(ConfigError, match="give ckpt_path or model_path, not both"):
        build_scorer({"model_path": str(tmp_path), "ckpt_path": "x.ckpt"})
    with pytest.raises(ConfigError, match="ckpt_path is required"):
        build_scorer({"ckpt_path": None})


@pytest.mark.integration
def test_an_export_folder_is_served_as_predict_runs_it(
    ckpt: Path, good: Path, tmp_path: Path
) -> None:
    """`serve model_path=EXPORT` runs the exported file and answers what
    `predict model_path=EXPORT` writes for the same images."""
    from vision_tl.inference.export import run_export

    export = tmp_path / "export"
    run_export(compose_entry("export", [f"ckpt_path={ckpt}", "format=onnx"], export))
    with pytest.raises(ConfigError, match="give ckpt_path or model_path, not both"):
        build_scorer({"model_path": str(export), "ckpt_path": str(ckpt)})
    frame = run_predict(
        compose_entry("predict", [f"model_path={export}", f"input={good}"], tmp_path / "p")
    ).set_index("path")
    args = [f"model_path={export}", "serve.max_batch_size=4", f"hydra.run.dir={tmp_path / 's'}"]
    with serving(args, tmp_path) as url:
        info = httpx.get(f"{url}/info", timeout=10).json()["model"]
        assert info["model"].endswith(".onnx") and "checkpoint" not in info
        names = sorted(p.name for p in good.glob("*.png"))
        files = [("file", (n, (good / n).read_bytes(), "image/png")) for n in names[:4]]
        response = httpx.post(f"{url}/predict", files=files, timeout=60)
    assert response.status_code == 200, response.text
    for answer in response.json()["predictions"]:
        row = frame.loc[answer["name"]]
        assert answer["label"] == row.label
        assert answer["confidence"] == pytest.approx(row.confidence, abs=1e-5)


def test_a_missing_serve_extra_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without the web stack installed (here: uvicorn hidden), serve says which extra to
    install."""
    from vision_tl.inference.serving import run_serve

    monkeypatch.delitem(sys.modules, "vision_tl.inference.serving.server", raising=False)
    monkeypatch.setitem(sys.modules, "uvicorn", None)
    with pytest.raises(ConfigError, match=r"pip install 'vision_tl\[serve\]'"):
        run_serve(compose_entry("serve", ["ckpt_path=x.ckpt"], Path("unused")))
