"""Experiment directory -> model bundle: average the last N checkpoints, score on dev, fit the
word confidence calibration on dev (`asr.calibration`), write."""

from __future__ import annotations

import json
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch

from asr.bundle import Bundle, write_bundle
from asr.calibration import Calibration
from asr.data.manifest import read_manifest
from asr.evaluation import evaluate, fit_calibration
from asr.features import CMVN
from asr.language_model import load_language_model
from asr.models import build_model
from asr.models.base import attach_cmvn, offers
from asr.recognizer import Recognizer, default_options
from asr.tokenizer import Tokenizer
from asr.training import checkpoint as ckpt
from asr.training.trainer import Experiment


def average_checkpoints(
    exp_dir: Path, average: int
) -> tuple[Experiment, dict[str, torch.Tensor], dict[str, Any]]:
    """The experiment of `exp_dir`, the mean of its newest `average` checkpoints' weights, and
    their provenance for a bundle's config.json (experiment, checkpoints, steps, epochs, wall
    time, validation history)."""
    found = ckpt.list_checkpoints(exp_dir)
    if not found:
        raise FileNotFoundError(f"{exp_dir}: no checkpoints to export")
    if average < 1:
        raise ValueError(f"--average must be >= 1, got {average}")
    chosen = found[-average:]
    newest = ckpt.load(chosen[-1])
    experiment = Experiment.from_dict(json.loads(newest["experiment"]))
    training = {
        "experiment": experiment.to_dict(),
        "checkpoints_averaged": [p.name for p in chosen],
        "steps": int(newest["step"]),
        "epochs_completed": int(newest["epoch"]),
        "wall_seconds": round(float(newest.get("train_seconds", 0.0)), 1),
        "history": json.loads(newest["history"]),
    }
    return experiment, ckpt.average_models(chosen), training


def export_experiment(
    exp_dir: str | Path,
    out_dir: str | Path,
    *,
    average: int = 1,
    calibrate: bool = True,
    calibration_manifest: str | Path | None = None,
    calibration_utterances: int = 300,
    lm: str | Path | None = None,
    lm_weight: float | None = None,
    length_bonus: float | None = None,
) -> Path:
    """Write a bundle from the newest `average` checkpoints of `exp_dir`, with dev results of
    the averaged weights (so the bundle's numbers describe exactly what it contains).

    With `calibrate`, word confidences are calibrated on `calibration_utterances` (evenly
    spaced) of `calibration_manifest` (default: the experiment's dev set) decoded with the
    bundle's default decoding; config.json's results["calibration"] says on what, and the
    words' ECE before and after (or why there is none: a model that gives no words).

    With `lm` (an LM bundle, ARPA file or LM mix, `asr.language_model`), a second calibration
    is fitted on the same utterances decoded with it fused at `lm_weight` (default the LM's
    `default_weight`) and `length_bonus` (default the LM's for that weight), for LM-fused
    transcripts; results["lm_calibration"] reports it, and the bundle records the weight and
    bonus, so that a recognizer fusing the same LM decodes as it was calibrated
    (`Bundle.lm_fusion`). The LM itself stays outside the bundle (`asr serve --lm`)."""
    if calibration_utterances < 1:
        raise ValueError(f"calibration utterances must be >= 1, got {calibration_utterances}")
    if lm is not None and not calibrate:
        raise ValueError("an LM is only used to calibrate for it: drop it or calibrate")
    exp_path = Path(exp_dir)
    experiment, weights, training = average_checkpoints(exp_path, average)
    tokenizer = Tokenizer.load(exp_path / "tokenizer.model")
    # Before any decoding: an unusable LM fails now, not after the first calibration.
    fused = load_language_model(lm, tokenizer) if lm is not None else None
    cmvn = CMVN.load(exp_path / "cmvn.json")

    model = build_model(experiment.model_type, experiment.model_config)
    model.load_state_dict(weights)
    attach_cmvn(model, cmvn)
    dev = read_manifest(experiment.dev_manifest)
    dev_eval = evaluate(
        model,
        dev,
        tokenizer,
        experiment.feature_config,
        torch.device("cpu"),
        max_frames=experiment.train.max_frames,
    )
    results: dict[str, Any] = {"dev": dev_eval.summary() | {"manifest": experiment.dev_manifest}}
    decoding = default_options(offers(model))
    calibration = lm_calibration = None
    lm_fusion: dict[str, float] | None = None
    if calibrate:
        bundle = Bundle(
            exp_path, experiment.model_type, model, tokenizer, cmvn, experiment.feature_config, {}
        )
        manifest = str(calibration_manifest or experiment.dev_manifest)
        heard = dev if manifest == experiment.dev_manifest else read_manifest(manifest)

        def fit_on(recognizer: Recognizer) -> tuple[Calibration | None, dict[str, Any]]:
            return fit_calibration(
                recognizer,
                heard,
                max_utterances=calibration_utterances,
                max_frames=experiment.train.max_frames,
            )

        calibration, report = fit_on(Recognizer(bundle, decoding))
        results["calibration"] = report | {"manifest": manifest, "method": decoding.method}
        if fused is not None:
            weight = fused.default_weight if lm_weight is None else lm_weight
            bonus = fused.length_bonus(weight) if length_bonus is None else length_bonus
            options = replace(decoding, lm_weight=weight, length_bonus=bonus)
            lm_fusion = {"lm_weight": weight, "length_bonus": bonus}
            lm_calibration, report = fit_on(Recognizer(bundle, options, lm=fused))
            results["lm_calibration"] = (
                report
                | {"manifest": manifest, "method": decoding.method, "lm": str(lm)}
                | lm_fusion
            )
    train_utts = read_manifest(experiment.train_manifest)
    training["train_hours"] = round(sum(u.duration for u in train_utts) / 3600, 3)
    return write_bundle(
        out_dir,
        model_type=experiment.model_type,
        model_config=experiment.model_config,
        weights=weights,
        tokenizer=tokenizer,
        cmvn=cmvn,
        feature_config=experiment.feature_config,
        training=training,
        results=results,
        decoding=asdict(decoding),
        calibration=calibration,
        lm_calibration=lm_calibration,
        lm_fingerprint=fused.fingerprint if fused is not None else None,
        lm_fusion=lm_fusion,
    )
