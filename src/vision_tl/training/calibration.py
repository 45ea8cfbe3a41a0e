"""Temperature scaling (Guo et al., ICML 2017): after training, one scalar T is fitted on
the val split's logits of the best checkpoint so that `softmax(logits / T)` is calibrated.

Dividing every logit by the same positive number never changes which class is largest,
so no prediction changes class; only the probabilities (and what `reject_threshold`
rejects) do. T is stored in the checkpoint's `vision_tl` dict; eval and predict apply it.

A second val pass decides the precision inference runs a fine-tuned backbone in
(`bf16_check`): bf16 where it is native and loses no more than `BF16_TOLERANCE` of val
accuracy, else fp32. T and the thresholds are fitted on the pass in that precision.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torchmetrics.functional.classification import multiclass_calibration_error

from vision_tl.core.runtime import native_bf16
from vision_tl.training.binary import fit_operating_point
from vision_tl.training.checkpoints import save_checkpoint
from vision_tl.training.openset import OpenSetSettings, detector_summary, fit_for_run

log = logging.getLogger(__name__)

ECE_BINS = 15  # as `python -m vision_tl.eval` bins its ECE
# T is kept within these bounds: beyond them the val split is too small to say more.
MIN_TEMPERATURE, MAX_TEMPERATURE = 0.05, 20.0
# How much val accuracy bf16 inference may lose against fp32 for `precision=auto` to
# choose it (0.3 points: what a user would not trade for 1.5-2x the images/s on a CPU).
BF16_TOLERANCE = 0.003
KEYS = ("temperature", "val_ece", "val_ece_uncalibrated", "val_nll", "val_nll_uncalibrated")


def fit_temperature(logits: torch.Tensor, target: torch.Tensor) -> float:
    """The T in [0.05, 20] minimising the NLL of `softmax(logits / T)` (LBFGS on log T, where
    the problem is smooth and unconstrained); 1.0 when fitting does not lower the NLL."""
    logits, target = logits.detach().double(), target.detach()
    if len(target) == 0:
        return 1.0
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=0.5, max_iter=100, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(logits / log_t.exp(), target)
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    value = float(log_t.detach().exp())
    if not math.isfinite(value):
        return 1.0
    value = min(max(value, MIN_TEMPERATURE), MAX_TEMPERATURE)
    if nll(logits, target, value) >= nll(logits, target, 1.0):
        return 1.0
    return value


def nll(logits: torch.Tensor, target: torch.Tensor, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of the true class at temperature T."""
    return float(F.cross_entropy(logits.double() / temperature, target))


def ece(logits: torch.Tensor, target: torch.Tensor, temperature: float = 1.0) -> float:
    """Expected calibration error (top-label, 15 equal-width bins, L1), as eval reports it."""
    probs = (logits.double() / temperature).softmax(1)
    return float(
        multiclass_calibration_error(probs, target, logits.shape[1], n_bins=ECE_BINS, norm="l1")
    )


def calibration_report(logits: torch.Tensor, target: torch.Tensor) -> dict[str, float | None]:
    """The fitted temperature and the val ECE and NLL before and after it (metrics.json keys)."""
    if len(target) == 0:
        return uncalibrated_report()
    temperature = fit_temperature(logits, target)
    return {
        "temperature": temperature,
        "val_ece": ece(logits, target, temperature),
        "val_ece_uncalibrated": ece(logits, target),
        "val_nll": nll(logits, target, temperature),
        "val_nll_uncalibrated": nll(logits, target),
    }


def uncalibrated_report() -> dict[str, float | None]:
    """What a run reports when no temperature could be fitted: T = 1, no scores."""
    return {key: 1.0 if key == "temperature" else None for key in KEYS}


def store_calibration(path: str | Path, fitted: dict[str, Any]) -> None:
    """Write what was fitted on val (T, the binary operating point) into a checkpoint's
    `vision_tl` dict, atomically (a crash or a full disk leaves the old file, and no
    temporary one)."""
    path = Path(path)
    checkpoint: dict[str, Any] = torch.load(path, map_location="cpu", weights_only=True)
    checkpoint.setdefault("vision_tl", {}).update(fitted)
    save_checkpoint(checkpoint, path)


def val_logits(
    trainer: L.Trainer, task: Any, datamodule: L.LightningDataModule, ckpt_path: str | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The val split's logits, labels and backbone features of `ckpt_path` (the task's
    current weights when None; the task holds these weights afterwards), from one
    `trainer.validate` pass with the task collecting instead of logging."""
    with task.collecting_val_logits() as chunks:
        trainer.validate(
            task, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True, verbose=False
        )
    if not chunks:
        empty = torch.empty(0, len(task.class_names))
        return empty, torch.empty(0, dtype=torch.long), torch.empty(0, 0)
    return tuple(torch.cat([c[i] for c in chunks]) for i in range(3))  # type: ignore[return-value]


def accuracy(logits: torch.Tensor, target: torch.Tensor) -> float:
    return float((logits.argmax(1) == target).float().mean())


def bf16_check(
    trainer: L.Trainer,
    task: Any,
    datamodule: L.LightningDataModule,
    logits: torch.Tensor,
    target: torch.Tensor,
) -> tuple[dict[str, Any], torch.Tensor, torch.Tensor] | None:
    """The val split once more with the backbone under bf16 autocast, where bf16 is native
    and val ran the backbone on images (a probe's features already carry their precision):
    `chosen` is bf16 when its val accuracy is within `BF16_TOLERANCE` of fp32's, the
    precision predict and serve then run this checkpoint in with `precision=auto`. Returns
    the check and the bf16 pass's val logits and features; None: not checked (inference
    keeps the precision training validated)."""
    device = trainer.strategy.root_device
    if task.feature_inputs or len(target) == 0 or not native_bf16(device):
        return None
    with torch.autocast(device.type, dtype=torch.bfloat16):
        _, _, features = val_logits(trainer, task, datamodule, None)
    features = features.float()
    with torch.no_grad():  # the head in float32 on the bf16 features, as inference runs it
        low = task.model.classify_features(features.to(device)).float().cpu()
    fp32, bf16 = accuracy(logits, target), accuracy(low, target)
    check = {
        "chosen": "bf16" if bf16 >= fp32 - BF16_TOLERANCE else "fp32",
        "val_acc_fp32": round(fp32, 6),
        "val_acc_bf16": round(bf16, 6),
        "top1_agreement": round(accuracy(low, logits.argmax(1)), 6),
        "images": len(target),
    }
    log.info(
        "Inference precision %s: val accuracy %.4f in bf16, %.4f in fp32 (top-1 agreement "
        "%.4f, %d images; bf16 when it loses at most %.1f points)",
        check["chosen"],
        bf16,
        fp32,
        check["top1_agreement"],
        len(target),
        100 * BF16_TOLERANCE,
    )
    return check, low, features


def calibrate_run(
    trainer: L.Trainer,
    task: Any,
    datamodule: L.LightningDataModule,
    best_path: str | None,
    checkpoints: list[str],
    operating: dict[str, Any] | None = None,
    open_set: OpenSetSettings | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Fit T on the best checkpoint's val logits and store it in every checkpoint given,
    with the precision inference may run it in (`bf16_check`); with two classes and a
    target in `operating` (`operating_point.*`), the threshold that meets it on the
    calibrated val probabilities too; with an `open_set` score, the open-set detector
    (`training.openset`) of the best weights. When bf16 is chosen, all three are fitted
    on the bf16 pass: the scores predict and serve compute.

    With several processes each holds a share of val; rather than gather them, the run
    keeps T = 1 and says so (calibrate afterwards with a single-process run if needed)."""
    if trainer.world_size > 1:
        log.warning(
            "Calibration skipped: %d processes each see part of val; temperature stays 1.0",
            trainer.world_size,
        )
        return uncalibrated_report()
    logits, target, features = val_logits(trainer, task, datamodule, best_path or None)
    if len(target) == 0:
        log.warning("Calibration skipped: the val split gave no logits; temperature stays 1.0")
        return calibration_report(logits.float(), target)
    fitted: dict[str, Any] = {}
    checked = bf16_check(trainer, task, datamodule, logits, target)
    if checked is not None:
        check, low_logits, low_features = checked
        fitted["inference_precision"] = check["chosen"]
        if check["chosen"] == "bf16":  # fitted on what predict and serve will compute
            logits, features = low_logits, low_features
    precision = fitted.get("inference_precision", "fp32")
    report = calibration_report(logits.float(), target)
    if checked is not None:
        report = {**report, "bf16_check": checked[0]}
    fitted["temperature"] = float(report["temperature"])
    wanted = {k: v for k, v in (operating or {}).items() if v is not None}
    if wanted.keys() & {"target_precision", "target_recall"}:
        probs = (logits.double() / report["temperature"]).softmax(1)
        point = fit_operating_point(
            probs,
            target,
            task.class_names,
            precision=wanted.get("target_precision"),
            recall=wanted.get("target_recall"),
            positive=wanted.get("positive_class"),
        )
        if point is None:
            log.warning(
                "operating_point: no threshold meets %s on the %d val images (or not two "
                "classes); predict keeps the most probable class",
                wanted,
                len(target),
            )
        else:
            log.info(
                "Operating point: %s when p >= %.4f (val precision %.4f, recall %.4f)",
                point.positive,
                point.threshold,
                point.precision,
                point.recall,
            )
            fitted["operating_point"] = point.as_dict()
            report = {**report, "operating_point": point.as_dict()}
    if open_set is not None and open_set.score is not None:
        device = trainer.strategy.root_device
        temperature = float(report["temperature"])
        detector = fit_for_run(
            open_set,
            task.model,
            datamodule,
            (logits, features),
            temperature,
            device,
            seed,
            precision,
        )
        if detector is not None:
            fitted["open_set"] = detector.as_dict()
            report = {**report, "open_set": detector_summary(detector)}
            log.info(
                "Open set: %s score, unknown below %.4f (keeps %.0f%% of %d known val images)",
                detector.kind,
                detector.threshold,
                100 * detector.tpr,
                len(target),
            )
    for path in checkpoints:
        store_calibration(path, fitted)
    log.info(
        "Temperature %.3f on %d val images: ECE %.4f -> %.4f, NLL %.4f -> %.4f",
        report["temperature"],
        len(target),
        report["val_ece_uncalibrated"],
        report["val_ece"],
        report["val_nll_uncalibrated"],
        report["val_nll"],
    )
    return report
