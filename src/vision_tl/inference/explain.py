"""`run_explain(cfg)`: Grad-CAM overlays with `pytorch_grad_cam`, the worker of
`python -m vision_tl.explain`: which pixels drive a class score.

The target layer is each backbone's deepest stage that still outputs a spatial map. An
ensemble gets one overlay per member, all explaining the fused (final) class score. When
members need different preprocessing, each member's map is computed on, and drawn over,
that member's own input (its size, crop and normalisation), the other members' inputs held
fixed.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from omegaconf import DictConfig
from PIL import Image
from torch import nn
from torch.utils.data import default_collate

from vision_tl.core.errors import ConfigError
from vision_tl.core.io import write_csv
from vision_tl.core.runtime import resolve_device
from vision_tl.core.validate import did_you_mean
from vision_tl.data.augment import denormalize_batch, eval_transform, normalize_batch
from vision_tl.data.decode import ReadLimits, error_line
from vision_tl.data.preprocess import EnsemblePreprocess, per_member
from vision_tl.inference.checkpoint import LoadedModel, load_checkpoint
from vision_tl.inference.predictor import collect_inputs, write_unreadable
from vision_tl.models.backbones import Backbone

log = logging.getLogger(__name__)

# Gradient-based methods of `pytorch_grad_cam`, by the name used in `method=`.
METHODS = {
    "gradcam": "GradCAM",
    "gradcam++": "GradCAMPlusPlus",
    "xgradcam": "XGradCAM",
    "layercam": "LayerCAM",
}


def cam_class(method: str) -> type:
    """The `pytorch_grad_cam` class for a `method=` name."""
    import pytorch_grad_cam

    if method not in METHODS:
        hint = did_you_mean(str(method), list(METHODS))
        raise ConfigError(f"method={method}: one of {', '.join(METHODS)}{hint}")
    return getattr(pytorch_grad_cam, METHODS[method])


def target_layer(backbone: Backbone, input_size: int) -> nn.Module:
    """The deepest stage module whose output is a feature map (N, C, H, W).

    Stages are tried from the output end, looking inside each stage's modules, so a
    flattening classifier or global pool is skipped; a map larger than 1x1 is preferred.
    """
    modules = [m for stage in backbone.stages for m in stage.parts]
    shapes: dict[int, torch.Size] = {}

    def record(module: nn.Module, _: Any, output: Any) -> None:
        if isinstance(output, torch.Tensor):
            shapes[id(module)] = output.shape

    hooks = [m.register_forward_hook(record) for m in modules]
    try:
        device = next(backbone.parameters()).device
        with torch.no_grad():
            backbone(torch.zeros(1, 3, input_size, input_size, device=device))
    finally:
        for hook in hooks:
            hook.remove()
    maps = [m for m in reversed(modules) if len(shapes.get(id(m), ())) == 4]
    if not maps:
        raise ConfigError(f"backbone {backbone.name} has no stage with a spatial feature map")
    return next((m for m in maps if shapes[id(m)][2] * shapes[id(m)][3] > 1), maps[0])


@dataclass
class Explanation:
    """Overlays (H, W, 3 uint8) of one image, by member name (`""` for a single backbone)."""

    index: int
    predicted: int
    probability: float
    target: int
    overlays: dict[str, np.ndarray]


def resolve_target(target: Any, class_names: list[str]) -> int | None:
    """A class name or index to explain; None means each image's predicted class."""
    if target is None:
        return None
    if str(target) in class_names:
        return class_names.index(str(target))
    if isinstance(target, int) and 0 <= target < len(class_names):
        return target
    raise ConfigError(f"target={target} is not a class name or index of {class_names}")


def explain(
    loaded: LoadedModel,
    files: list[Path],
    target: int | None = None,
    method: str = "gradcam",
    batch_size: int = 8,
    device: str = "auto",
    limits: ReadLimits | None = None,
) -> tuple[list[Explanation], list[tuple[int, str]]]:
    """Overlays for each readable file (read within `limits`, as training reads), and the
    unreadable ones as (index, reason)."""
    model = loaded.model.to(resolve_device(device)).eval()
    backbones = model.backbones()
    members = per_member(loaded.preprocess, len(backbones))
    per_input = isinstance(loaded.preprocess, EnsemblePreprocess)
    # Not `with cam:` - BaseCAM.__exit__ swallows IndexError; hooks are released below.
    cam_type = cam_class(method)
    cams = {
        member_name(i, b, len(backbones)): cam_type(
            model=MemberInput(model, i) if per_input else model,
            target_layers=[target_layer(b, pre.input_size)],
        )
        for i, (b, pre) in enumerate(zip(backbones, members, strict=True))
    }
    explainer = _BatchExplainer(model, cams, loaded, target, limits or ReadLimits())
    results: list[Explanation] = []
    unreadable: list[tuple[int, str]] = []
    try:
        for start in range(0, len(files), batch_size):
            batch = range(start, min(start + batch_size, len(files)))
            results += explainer(files, batch, unreadable)
    finally:
        for cam in cams.values():
            cam.activations_and_grads.release()
    return results, unreadable


def member_name(index: int, backbone: Backbone, members: int) -> str:
    """`""` for a single backbone, else e.g. `member0_resnet18` (unique, file-name safe)."""
    return "" if members == 1 else f"member{index}_{backbone.name.replace('/', '_')}"


class MemberInput(nn.Module):
    """An ensemble with per-member inputs as a function of member `index`'s batch alone
    (the others' batches, `others`, held fixed), so Grad-CAM maps that member's input."""

    def __init__(self, model: nn.Module, index: int) -> None:
        super().__init__()
        self.model = model
        self.index = index
        self.others: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        inputs = list(self.others)
        inputs[self.index] = x
        return self.model(inputs)


class _BatchExplainer:
    """Decode a batch, predict, and compute every member's heatmap for the target classes."""

    def __init__(
        self,
        model: nn.Module,
        cams: dict[str, Any],
        loaded: LoadedModel,
        target: int | None,
        limits: ReadLimits,
    ) -> None:
        self.model = model
        self.limits = limits
        self.cams = cams
        self.target = target
        self.preprocess = loaded.preprocess
        self.transform = eval_transform(loaded.preprocess)
        self.device = next(model.parameters()).device

    def __call__(
        self, files: list[Path], batch: range, unreadable: list[tuple[int, str]]
    ) -> list[Explanation]:
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

        tensors, indices = [], []
        for i in batch:
            try:
                image = self.preprocess.read(files[i], self.limits)
                tensors.append(self.transform(image))
                indices.append(i)
            except Exception as err:  # listed, never fatal, as in predict
                unreadable.append((i, error_line(err)))
        if not tensors:
            return []
        batch = default_collate(tensors)
        if isinstance(batch, torch.Tensor):
            batch = [batch]
        pres = per_member(self.preprocess, len(batch))
        x = [normalize_batch(t.to(self.device), p) for t, p in zip(batch, pres, strict=True)]
        with torch.no_grad():
            fused = self.model(x if len(x) > 1 else x[0])
            conf, pred = fused.float().softmax(dim=1).max(dim=1)
        targets = [self.target if self.target is not None else p for p in pred.tolist()]
        outputs = [ClassifierOutputTarget(t) for t in targets]
        heatmaps, images = {}, {}
        for i, (name, cam) in enumerate(self.cams.items()):
            k = i if len(x) > 1 else 0  # the input this member reads
            if isinstance(cam.model, MemberInput):
                cam.model.others = x
            # Gradients must reach the target layer even when the backbone is frozen.
            x_grad = x[k].detach().requires_grad_(True)
            heatmaps[name] = cam(input_tensor=x_grad, targets=outputs)
            images[name] = denormalize_batch(x[k], pres[k]).cpu().permute(0, 2, 3, 1).numpy()
        return [
            Explanation(
                index,
                int(pred[j]),
                float(conf[j]),
                targets[j],
                {name: overlay(images[name][j], maps[j]) for name, maps in heatmaps.items()},
            )
            for j, index in enumerate(indices)
        ]


def overlay(rgb: np.ndarray, heatmap: np.ndarray) -> np.ndarray:
    """Blend a [0, 1] heatmap (jet colours) onto an RGB float image."""
    from pytorch_grad_cam.utils.image import show_cam_on_image

    return show_cam_on_image(rgb.astype(np.float32), heatmap, use_rgb=True)


def run_explain(cfg: DictConfig) -> pd.DataFrame:
    """Write `overlays/[<member>/]<n>_<stem>.png` per image and `explanations.csv`."""
    out = Path(cfg.paths.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    loaded = load_checkpoint(cfg.get("ckpt_path"))
    inputs = collect_inputs(cfg.get("input"))
    target = resolve_target(cfg.get("target"), loaded.class_names)
    limits = ReadLimits.from_config(cfg.get("data"))
    results, unreadable = explain(
        loaded, inputs.files, target, cfg.method, int(cfg.batch_size), cfg.device, limits
    )
    rows = []
    for r in results:
        name = f"{r.index:04d}_{inputs.files[r.index].stem}.png"
        for member, image in r.overlays.items():
            file = Path("overlays", member, name)
            (out / file).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(out / file)
            rows.append(
                {
                    "path": inputs.names[r.index],
                    "member": member or None,
                    "predicted": loaded.class_names[r.predicted],
                    "probability": r.probability,
                    "target": loaded.class_names[r.target],
                    "file": file.as_posix(),
                }
            )
    columns = ["path", "member", "predicted", "probability", "target", "file"]
    frame = pd.DataFrame(rows, columns=columns)
    write_csv(frame, out / "explanations.csv", index=False, float_format="%.6g")
    write_unreadable(out / "unreadable.csv", inputs.names, unreadable)
    log.info("%d overlay(s) for %d image(s) in %s", len(frame), len(results), out)
    return frame
