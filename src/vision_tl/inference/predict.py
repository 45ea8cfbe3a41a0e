"""`run_predict(cfg)`: predictions for unlabelled images (worker of `vision_tl.predict`), and
`predict_for_run`, the step a training run with `predict_input` ends with."""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd
from omegaconf import DictConfig, OmegaConf

from vision_tl.core.errors import ConfigError
from vision_tl.core.io import write_csv
from vision_tl.inference.checkpoint import load_checkpoint, load_export
from vision_tl.inference.predictor import (
    LabelRule,
    collect_inputs,
    predictions_frame,
    predictor_from_config,
    predictor_from_export,
    write_unreadable,
)
from vision_tl.inference.submission import submission_frame, submission_settings

log = logging.getLogger(__name__)


def run_predict(cfg: DictConfig) -> pd.DataFrame:
    """Write `predictions.csv` (and `submission.csv`, `unreadable.csv`) into the run dir."""
    out = Path(cfg.paths.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if cfg.get("model_path"):  # an exported model (python -m vision_tl.export)
        if cfg.get("ckpt_path"):
            raise ConfigError("give ckpt_path or model_path, not both")
        exported = load_export(cfg.model_path)
        predictor = predictor_from_export(exported, cfg)
        class_names, source = exported.class_names, exported.file
        operating_point, open_set = exported.operating_point, exported.open_set
    else:
        loaded = load_checkpoint(cfg.get("ckpt_path"))
        predictor = predictor_from_config(loaded, cfg)
        class_names, source = loaded.class_names, loaded.path
        operating_point, open_set = loaded.operating_point, loaded.open_set
    if not cfg.get("apply_open_set", True):
        open_set = None
    inputs = collect_inputs(cfg.get("input"))
    log.info("Predicting %d image(s) from %s with %s", len(inputs.files), cfg.input, source)
    result = predictor.predict(inputs.files, keep_outputs=open_set is not None)
    scores = None
    if open_set is not None and result.logits is not None:
        scores = open_set.scores(result.features, result.logits, predictor.temperature)
        log.info(
            "Open set: %d of %d image(s) score below the fitted %s threshold %.4f: unknown",
            int((scores < open_set.threshold).sum()),
            len(scores),
            open_set.kind,
            open_set.threshold,
        )
    log.info(
        "Engine %s (%s), batch %d", predictor.engine, predictor.precision, predictor.batch_size
    )
    rule = LabelRule.from_config(cfg, operating_point, open_set)
    names = [inputs.names[i] for i in result.indices]
    frame = predictions_frame(names, result.probs, class_names, rule, scores)
    write_csv(frame, out / "predictions.csv", index=False, float_format="%.6g")
    write, template = submission_settings(cfg.get("submission"))
    if write:
        ids = [inputs.ids[i] for i in result.indices]
        if len(set(ids)) < len(ids):
            log.warning("submission.csv has duplicate ids (same file stem in several folders)")
        submission = submission_frame(
            ids, list(frame["label"]), result.probs, class_names, template
        )
        write_csv(submission, out / "submission.csv", index=False)
    write_unreadable(out / "unreadable.csv", inputs.names, result.unreadable)
    log.info(
        "%d prediction(s) in %s (%.1f images/s)",
        len(frame),
        out / "predictions.csv",
        result.images_per_second,
    )
    return frame


def predict_for_run(cfg: DictConfig, ckpt_path: str, run_dir: Path) -> Path:
    """`predictions.csv` for a training config's `predict_input`, written into its run dir."""
    predict_cfg = OmegaConf.create(
        {
            "paths": {"output_dir": str(run_dir)},
            "ckpt_path": ckpt_path,
            "input": cfg.predict_input,
            "batch_size": cfg.data.batch_size,
            "num_workers": cfg.data.get("num_workers"),
            "device": "auto",
            "top_k": 3,
            "progress": False,
            "data": {
                "max_file_bytes": cfg.data.get("max_file_bytes"),
                "max_image_pixels": cfg.data.get("max_image_pixels"),
            },
        }
    )
    run_predict(predict_cfg)
    return run_dir / "predictions.csv"
