"""CPU inference against the machine's limit: `predict` and the feature cache vs a careful script.

    .venv/bin/python bench/inference_speed.py --finetune FT.ckpt --probe PROBE.ckpt [--rounds 3]

The checkpoints: EfficientNet-Lite0 with the shared ImageNet weights on hymenoptera, e.g.
`python -m vision_tl.train data.root=../shared/datasets/hymenoptera finetune=full
trainer.max_epochs=4 optimizer.lr=0.001 model.backbone.name=timm/tf_efficientnet_lite0
model.backbone.weights_path=../shared/weights/tf_efficientnet_lite0.in1k.safetensors`, and
the same with `finetune=linear_probe`.

The images: hymenoptera's 396 photos `--copies` times (3: 1,188 files), as
`{ants,bees}/<copy>_<name>`; a larger `--copies` shows the whole process where start-up
weighs less.
Each round measures, in alternating order so background load hits every side alike:
- `baseline`: what a careful user writes: the checkpoint's network in fp32, timm's eval
  transform on PIL images, `DataLoader(batch 32, 2 workers)`, `torch.inference_mode()`;
  the loop alone (model loading not counted);
- `vision_tl`: `python -m vision_tl.predict ckpt_path=CKPT input=DIR` as it ships, the
  whole process timed (start-up, conversion, writing the CSV); `_steady`: the same
  `Predictor` in this process, already compiled (what a server or a second folder sees);
- `decode`: vision_tl's decode path alone (the predictor's loader, no model);
- `model`: the network alone on random batches, on the fastest engine here (OpenVINO bf16,
  batch 8), and eager PyTorch bf16 for reference;
- `features`: the feature cache's extraction of every image for the probe (cold entry).
The pipeline limit is 1/(1/decode + 1/model): decoding and the model share the cores.
Accuracies are on hymenoptera's 153 val images. Prints one JSON document (medians).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import HYMENOPTERA, emit
from torch.utils.data import DataLoader

from vision_tl.core.engines import compile_forward
from vision_tl.core.runtime import inference_copy
from vision_tl.inference.checkpoint import load_checkpoint
from vision_tl.inference.predictor import Predictor, collect_inputs


def image_folder(work: Path, copies: int) -> Path:
    """hymenoptera's train and val photos, `copies` times, one folder per class."""
    root = work / "images"
    for copy in range(copies):
        for path in sorted(HYMENOPTERA.glob("*/*/*.jpg")):
            target = root / path.parent.name / f"{copy}_{path.parent.parent.name}_{path.name}"
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, target)
    return root


def timm_eval_transform(model: torch.nn.Module):
    """timm's own eval transform for the checkpoint's backbone (PIL in, float tensor out)."""
    from timm.data import create_transform, resolve_data_config

    timm_model = model.backbone.body
    return create_transform(**resolve_data_config({}, model=timm_model))


class PILFiles(torch.utils.data.Dataset):
    def __init__(self, files: list[Path], transform) -> None:
        self.files, self.transform = files, transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        from PIL import Image

        with Image.open(self.files[i]) as image:
            return self.transform(image.convert("RGB")), i


def baseline(model: torch.nn.Module, files: list[Path]) -> tuple[float, torch.Tensor]:
    """The careful script: fp32 eager, timm transform, PIL, 2 workers, batch 32."""
    loader = DataLoader(PILFiles(files, timm_eval_transform(model)), batch_size=32, num_workers=2)
    preds = []
    start = time.perf_counter()
    with torch.inference_mode():
        for x, _ in loader:
            preds.append(model(x).argmax(1))
    return len(files) / (time.perf_counter() - start), torch.cat(preds)


def vision_tl_predict(ckpt: Path, images: Path, out: Path, *extra: str) -> float:
    """`python -m vision_tl.predict` as a user runs it; images/s over the whole process."""
    command = [
        sys.executable,
        "-m",
        "vision_tl.predict",
        f"ckpt_path={ckpt}",
        f"input={images}",
        "progress=false",
        f"hydra.run.dir={out}",
        *extra,
    ]
    start = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True)
    seconds = time.perf_counter() - start
    rows = len((out / "predictions.csv").read_text().splitlines()) - 1
    return rows / seconds


def decode_only(pre, files: list[Path], batch: int = 8, workers: int = 2) -> float:
    """The predictor's loader (decode, resize, crop) with nothing consuming the batches."""
    predictor = Predictor(torch.nn.Identity(), pre, batch_size=batch, num_workers=workers)
    loader = predictor.loader(files)
    start = time.perf_counter()
    count = sum(len(index) for _, index, _ in loader)
    return count / (time.perf_counter() - start)


def model_only(model, engine: str, precision: str, batch: int = 8, seconds: float = 4.0) -> float:
    """The network alone (backbone on `engine` in `precision`, head in fp32) on random batches."""
    copy = inference_copy(model, precision)
    runner = compile_forward(copy, engine, precision, torch.device("cpu"), "features")
    x = torch.randn(batch, 3, 224, 224)
    runner(x)
    runner(x)
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        with torch.inference_mode():
            copy.classify_features(runner(x))
        count += batch
    return count / (time.perf_counter() - start)


def features_extraction(ckpt: Path, images: Path, cache: Path, engine: str) -> float:
    """The feature cache's cold extraction of every image (eval transform), images/s."""
    from vision_tl.data.features import build_features
    from vision_tl.training.build import build_data, preprocess_overrides

    loaded = load_checkpoint(ckpt)
    keys = {
        "root": str(images),
        "augment": "none",
        "cache": str(cache / f"{engine}-{time.time_ns()}"),
        "feature_engine": engine,
    }
    data = build_data(keys)
    dm = data.datamodule(loaded.preprocess.resolve(preprocess_overrides(keys, data.source)))
    cached = build_features(data.feature_spec, dm, loaded.model, torch.device("cpu"))
    return len(cached.eval_store.files) / cached.eval_store.seconds


def val_accuracy(predict, files: list[Path], classes: list[str]) -> float:
    target = torch.tensor([classes.index(f.parent.name) for f in files])
    return round(float((predict(files).cpu() == target).float().mean()), 4)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--finetune", type=Path, required=True)
    parser.add_argument("--probe", type=Path, required=True)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--copies", type=int, default=3, help="hymenoptera's photos N times")
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument("--sides", default="", help="comma-separated subset of the sides")
    parser.add_argument("--no-accuracy", action="store_true", help="images/s only")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="vtl-inference-speed-"))
    images = image_folder(work, args.copies)
    files = collect_inputs(images).files
    val_files = collect_inputs(HYMENOPTERA / "val").files
    models = {"finetune": args.finetune, "probe": args.probe}
    loaded = {name: load_checkpoint(path) for name, path in models.items()}
    pre = loaded["probe"].preprocess

    accuracy: dict[str, dict[str, float]] = {}
    for name, model in loaded.items() if not args.no_accuracy else ():
        classes = model.class_names
        net = model.model.eval()

        def run_baseline(fs: list[Path], net=net) -> torch.Tensor:
            return baseline(net, fs)[1]

        def run_predictor(fs: list[Path], engine: str, model=model) -> torch.Tensor:
            predictor = Predictor(
                model.model, model.preprocess, precision=model.precision, engine=engine
            )
            return predictor.predict(fs).probs.argmax(1)

        accuracy[name] = {
            "baseline_fp32": val_accuracy(run_baseline, val_files, classes),
            "vision_tl_auto": val_accuracy(
                lambda fs: run_predictor(fs, "auto"), val_files, classes
            ),
            "vision_tl_torch": val_accuracy(
                lambda fs: run_predictor(fs, "torch"), val_files, classes
            ),
        }

    steady = {
        name: Predictor(model.model, model.preprocess, precision=model.precision, engine="auto")
        for name, model in loaded.items()
    }
    for predictor in steady.values():
        predictor.predict(files[:16])  # compiled (and converted) once, as a server would

    sides = {
        "vision_tl_finetune_steady": lambda: steady["finetune"].predict(files).images_per_second,
        "vision_tl_probe_steady": lambda: steady["probe"].predict(files).images_per_second,
        "baseline_finetune": lambda: baseline(loaded["finetune"].model.eval(), files)[0],
        "vision_tl_finetune": lambda: vision_tl_predict(
            args.finetune, images, work / f"ft-{time.time_ns()}"
        ),
        "baseline_probe": lambda: baseline(loaded["probe"].model.eval(), files)[0],
        "vision_tl_probe": lambda: vision_tl_predict(
            args.probe, images, work / f"probe-{time.time_ns()}"
        ),
        "decode": lambda: decode_only(pre, files),
        "model_openvino_bf16": lambda: model_only(loaded["probe"].model, "openvino", "bf16"),
        "model_torch_bf16": lambda: model_only(loaded["probe"].model, "torch", "bf16"),
        "features_probe": lambda: features_extraction(args.probe, images, work, "auto"),
        "features_probe_eager": lambda: features_extraction(args.probe, images, work, "torch"),
    }
    if args.sides:
        sides = {side: run for side, run in sides.items() if side in args.sides.split(",")}
    timings: dict[str, list[float]] = {side: [] for side in sides}
    for round_ in range(args.rounds):
        order = list(sides) if round_ % 2 == 0 else list(reversed(sides))
        for side in order:
            timings[side].append(round(sides[side](), 1))
            print(f"round {round_} {side}: {timings[side][-1]}", file=sys.stderr, flush=True)
    median = {side: round(statistics.median(values), 1) for side, values in timings.items()}
    decode, model = median.get("decode"), median.get("model_openvino_bf16")
    limit = 1 / (1 / decode + 1 / model) if decode and model else float("nan")
    emit(
        "inference_speed",
        {
            "images": len(files),
            "rounds": args.rounds,
            "images_per_s": timings,
            "median": median,
            "pipeline_limit": round(limit, 1),
            "share_of_limit": {
                side: round(median[side] / limit, 3)
                for side in median
                if side.startswith(("vision_tl", "baseline", "features"))
            },
            "val_acc": accuracy,
        },
    )


if __name__ == "__main__":
    main()
