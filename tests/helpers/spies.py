"""A callback that watches a real training run from the inside, for tests that must fail
when the run silently does something else than its config says."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning as L
import torch


class RunSpy(L.Callback):
    """Write `spy.json` into the run dir: backbone forward calls during fit (after the
    feature cache was built), the autocast state inside the backbone, the trainer's precision,
    the loss function's class weights; and what the fit starts from: the val accuracy of the
    model as handed to the training loop, the optimizer groups' LRs and weight decays, the
    largest value in the layers that give the class scores, which backbone parameters
    train, and whether BatchNorm statistics and backbone weights moved."""

    def __init__(self) -> None:
        self.calls = 0
        self.teacher_calls = 0
        self.autocast: list[str] = []
        self._hooks: list[Any] = []
        self.start: dict[str, Any] = {}
        self._backbone: dict[str, torch.Tensor] = {}

    def _seen(self, module: torch.nn.Module, inputs: Any) -> None:
        self.calls += 1
        device = inputs[0].device.type if inputs and torch.is_tensor(inputs[0]) else "cpu"
        enabled = torch.is_autocast_enabled(device)
        self.autocast.append(str(torch.get_autocast_dtype(device)) if enabled else "off")

    @torch.no_grad()
    def _val_accuracy(self, trainer: L.Trainer, pl_module: L.LightningModule) -> float:
        was_training = pl_module.training
        pl_module.eval()
        right = total = 0
        dm = trainer.datamodule
        for batch in dm.val_dataloader():
            x, y = dm.on_after_batch_transfer(batch, 0)
            right += int((pl_module._logits(x).argmax(1) == y).sum())
            total += len(y)
        pl_module.train(was_training)
        return right / total

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        backbone_params = list(pl_module.model.backbone_parameters())
        self.start = {
            "val_acc": self._val_accuracy(trainer, pl_module),
            "group_lrs": [g.get("initial_lr", g["lr"]) for g in trainer.optimizers[0].param_groups],
            "group_weight_decays": [g["weight_decay"] for g in trainer.optimizers[0].param_groups],
            "logit_layers_abs_max": max(
                float(p.detach().abs().max())
                for m in pl_module.model.logit_layers()
                for p in m.parameters()
            ),
            "backbone_trainable": sum(p.requires_grad for p in backbone_params),
            "backbone_tensors": len(backbone_params),
        }
        self._backbone = {
            k: v.clone() for b in pl_module.model.backbones() for k, v in b.state_dict().items()
        }
        self._hooks = [b.register_forward_pre_hook(self._seen) for b in pl_module.model.backbones()]
        distill = getattr(pl_module, "distill", None)
        if distill is not None:
            self.start["cached_teacher_max_diff"] = self._cached_teacher_diff(trainer, distill)
            self._hooks.append(distill.teacher.register_forward_pre_hook(self._teacher_seen))

    def _teacher_seen(self, module: torch.nn.Module, inputs: Any) -> None:
        self.teacher_calls += 1

    @torch.no_grad()
    def _cached_teacher_diff(self, trainer: L.Trainer, distill: Any) -> float | None:
        """Largest difference between the teacher logits cached for the val images and the
        teacher run on those images now (None when nothing is cached)."""
        dm = trainer.datamodule
        if dm.features is None:
            return None
        rows, _ = dm.features.dataset("val", train=False)
        images = dm.image_dataset("val", train=False, report=False)
        cached = torch.stack([rows[i][0]["teacher"] for i in range(len(rows))])
        x = torch.stack([images[i][0] for i in range(len(images))])
        now = distill.teacher(dm.normalize(x).to(cached.device))
        return float((cached - now).abs().max())

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        for hook in self._hooks:
            hook.remove()
        weights = pl_module.class_weights
        record = {
            "backbone_calls": self.calls,
            "teacher_calls": self.teacher_calls,
            "autocast": sorted(set(self.autocast)),
            "precision": str(trainer.precision),
            "class_weights": None if weights is None else weights.tolist(),
            "feature_inputs": bool(pl_module.feature_inputs),
            "start": self.start,
            **self._moved(pl_module),
        }
        Path(trainer.default_root_dir, "spy.json").write_text(json.dumps(record))

    def _moved(self, pl_module: L.LightningModule) -> dict[str, bool]:
        now = {k: v for b in pl_module.model.backbones() for k, v in b.state_dict().items()}
        changed = {k for k, v in self._backbone.items() if not torch.equal(v, now[k])}
        return {
            "bn_stats_moved": any("running" in k for k in changed),
            "backbone_weights_moved": any(k.endswith("weight") for k in changed),
        }


class SamplesSpy(L.Callback):
    """Write `samples_rank<R>.json` into the run dir: the keys of the training samples
    this rank reads in each epoch (from its loader's sampler, as the loader will read)."""

    def __init__(self) -> None:
        self.epochs: list[list[str]] = []

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        loader = trainer.train_dataloader
        keys = [key for key, _ in loader.dataset.samples]
        self.epochs.append([keys[i] for i in loader.sampler])

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        out = Path(trainer.default_root_dir) / f"samples_rank{trainer.global_rank}.json"
        out.write_text(json.dumps(self.epochs))


class SeenSpy(L.Callback):
    """Append `{"epoch", "n"}` to `seen.jsonl` in the run dir after every training batch:
    what each epoch trained on, across an interrupted run and its resume."""

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, i: int
    ) -> None:
        line = json.dumps({"epoch": trainer.current_epoch, "n": len(batch[1])})
        with open(Path(trainer.default_root_dir) / "seen.jsonl", "a") as handle:
            handle.write(line + "\n")
