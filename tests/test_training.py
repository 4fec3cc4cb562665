"""The training loop end to end on a tiny synthetic corpus: resume after SIGKILL, SIGTERM,
non-finite batches, DDP over gloo with torchrun, export round trip."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from asr.bundle import load_bundle
from asr.data.manifest import read_manifest
from asr.evaluation import evaluate
from asr.features import CMVN, FeatureConfig
from asr.models import build_model, model_config
from asr.models.base import attach_cmvn
from asr.tokenizer import Tokenizer
from asr.training import checkpoint as ckpt
from asr.training.config import TrainConfig
from asr.training.export import export_experiment
from asr.training.trainer import Experiment, Trainer

TINY_MODEL = [
    "hidden_size=32",
    "num_layers=2",
    "projection_size=0",
    "subsampling_channels=4",
    "chunk_size=4",
    "right_context=2",
]
TINY_TRAIN = [
    "max_frames=700",
    "num_buckets=2",
    "checkpoint_every=2",
    "log_every=1",
    "num_workers=0",
    "warmup_steps=2",
    "keep_last=20",
]


def _train_cmd(corpus: dict[str, Path], exp: Path, *extra: str) -> list[str]:
    cmd = [sys.executable, "-m", "asr.cli", "train", "--exp-dir", str(exp), "--model", "ctc"]
    cmd += ["--preset", "cpu-small", "--train", str(corpus["manifest"])]
    cmd += ["--dev", str(corpus["manifest"]), "--tokenizer", str(corpus["tokenizer"])]
    cmd += ["--cmvn", str(corpus["cmvn"]), "--epochs", "5", "--no-progress", "--device", "cpu"]
    for item in TINY_MODEL:
        cmd += ["--model-set", item]
    for item in TINY_TRAIN:
        cmd += ["--set", item]
    return cmd + list(extra)


def _env() -> dict[str, str]:
    # One thread: identical float reductions in both runs, and no contention with pytest.
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def _losses(exp: Path) -> dict[int, float]:
    """Per-step training loss; a resumed run's re-logged steps replace the killed run's."""
    out: dict[int, float] = {}
    for line in (exp / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "loss" in record:
            out[record["step"]] = record["loss"]
    return out


@pytest.fixture(scope="module")
def reference_run(corpus: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    exp = tmp_path_factory.mktemp("reference") / "exp"
    subprocess.run(
        _train_cmd(corpus, exp, "--max-steps", "10"), check=True, env=_env(), capture_output=True
    )
    return exp


def test_reference_run_writes_logs_and_checkpoints(reference_run: Path) -> None:
    losses = _losses(reference_run)
    assert sorted(losses) == list(range(1, 11))
    assert all(v == v and v < float("inf") for v in losses.values())
    assert [p.name for p in ckpt.list_checkpoints(reference_run)][-1] == "ckpt-00000010.pt"
    assert any((reference_run / "tensorboard").iterdir())
    epochs = [json.loads(x) for x in (reference_run / "metrics.jsonl").read_text().splitlines()]
    assert any("wer" in r for r in epochs)  # an epoch ended and was validated
    state = torch.load(ckpt.list_checkpoints(reference_run)[-1], weights_only=True)
    assert {"model", "optimizer", "scheduler", "scaler", "sampler", "rng"} <= set(state)


def test_resume_after_sigkill_reproduces_losses(
    corpus: dict[str, Path], reference_run: Path, tmp_path: Path
) -> None:
    exp = tmp_path / "exp"
    cmd = _train_cmd(corpus, exp, "--max-steps", "10")
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while not (exp / "ckpt-00000006.pt").exists():  # mid-epoch 2
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        assert time.time() < deadline, "no checkpoint within 120 s"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    subprocess.run(cmd, check=True, env=_env(), capture_output=True)
    assert _losses(exp) == _losses(reference_run)


def test_resume_accepts_an_experiment_written_before_a_config_field_existed(
    corpus: dict[str, Path], reference_run: Path, tmp_path: Path
) -> None:
    exp = tmp_path / "exp"
    shutil.copytree(reference_run, exp)
    path = exp / "experiment.json"
    written = json.loads(path.read_text())
    del written["model"]["config"]["train_blocks"]  # as before train_blocks existed
    path.write_text(json.dumps(written))
    subprocess.run(  # resumes from its step-10 checkpoint rather than refusing
        _train_cmd(corpus, exp, "--max-steps", "2"), check=True, env=_env(), capture_output=True
    )
    losses = _losses(exp)
    assert {k: v for k, v in losses.items() if k <= 10} == _losses(reference_run)
    assert max(losses) > 10
    # A field that does differ is still another experiment.
    refused = subprocess.run(
        _train_cmd(corpus, exp, "--max-steps", "10", "--model-set", "dropout=0.2"),
        env=_env(),
        capture_output=True,
        text=True,
    )
    assert refused.returncode != 0 and "different experiment" in refused.stderr


def test_features_come_from_the_cmvn_file_and_travel_to_the_bundle(
    corpus: dict[str, Path], tmp_path: Path
) -> None:
    """`asr cmvn --features cepstra=13` computes statistics of smoothed features; a run
    trained on them computes those features, and so does its bundle."""
    cmvn = tmp_path / "cmvn.json"
    subprocess.run(
        [sys.executable, "-m", "asr.cli", "cmvn", "--manifest", str(corpus["manifest"])]
        + ["--out", str(cmvn), "--features", "cepstra=13", "--jobs", "1"],
        check=True,
        capture_output=True,
    )
    stats = CMVN.load(cmvn)
    assert stats.features == FeatureConfig(cepstra=13)
    assert stats.mean != CMVN.load(corpus["cmvn"]).mean  # of other features
    exp = tmp_path / "exp"
    run = {**corpus, "cmvn": cmvn}
    subprocess.run(
        _train_cmd(run, exp, "--max-steps", "2"), check=True, env=_env(), capture_output=True
    )
    assert json.loads((exp / "experiment.json").read_text())["features"]["cepstra"] == 13
    bundle = load_bundle(export_experiment(exp, tmp_path / "bundle", average=1))
    assert bundle.feature_config == FeatureConfig(cepstra=13)
    assert bundle.cmvn == stats
    # The same experiment directory with the default features is another experiment...
    refused = subprocess.run(
        _train_cmd(corpus, exp, "--max-steps", "2"), env=_env(), capture_output=True, text=True
    )
    assert refused.returncode != 0 and "different experiment" in refused.stderr
    # ...and statistics of other features than the run computes are refused outright.
    with pytest.raises(ValueError, match="statistics of features"):
        Trainer(tmp_path / "other", _experiment(corpus), corpus["tokenizer"], cmvn, progress=False)


def test_sigterm_writes_a_checkpoint_and_exits(corpus: dict[str, Path], tmp_path: Path) -> None:
    exp = tmp_path / "exp"
    proc = subprocess.Popen(
        _train_cmd(corpus, exp, "--set", "checkpoint_every=1000"),
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 120
    while not (exp / "metrics.jsonl").exists():
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 1
    assert "rerun the same command to resume" in err
    assert ckpt.list_checkpoints(exp), "no checkpoint after SIGTERM"


def _experiment(corpus: dict[str, Path], **train: Any) -> Experiment:
    model_overrides: dict[str, Any] = {
        item.split("=")[0]: int(item.split("=")[1]) for item in TINY_MODEL
    }
    config = model_config(
        "ctc",
        "cpu-small",
        vocab_size=Tokenizer.load(corpus["tokenizer"]).vocab_size,
        **model_overrides,
    )
    values = {
        "max_frames": 700,
        "num_buckets": 2,
        "num_workers": 0,
        "warmup_steps": 2,
        "epochs": 1,
        "checkpoint_every": 1000,
    } | train
    return Experiment(
        model_type="ctc",
        model_config=config.to_dict(),
        train=TrainConfig(**values),
        train_manifest=str(corpus["manifest"]),
        dev_manifest=str(corpus["manifest"]),
        preset="cpu-small",
    )


def test_non_finite_batches_are_skipped(corpus: dict[str, Path], tmp_path: Path) -> None:
    trainer = Trainer(
        tmp_path / "exp", _experiment(corpus), corpus["tokenizer"], corpus["cmvn"], progress=False
    )
    forward = trainer.model.forward
    calls = {"n": 0}

    def poisoned(*args: Any, **kwargs: Any) -> Any:
        out = forward(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 2:
            out.loss = out.loss * float("nan")
        return out

    trainer.model.forward = poisoned
    trainer.train()
    assert trainer.skipped_batches == 1
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())


def test_export_round_trip(corpus: dict[str, Path], reference_run: Path, tmp_path: Path) -> None:
    bundle_dir = export_experiment(reference_run, tmp_path / "bundle", average=2)
    assert sorted(p.name for p in bundle_dir.iterdir()) == [
        "cmvn.json",
        "config.json",
        "model.safetensors",
        "tokenizer.model",
    ]
    bundle = load_bundle(bundle_dir)
    config = json.loads((bundle_dir / "config.json").read_text())
    last_two = ckpt.list_checkpoints(reference_run)[-2:]
    assert config["training"]["checkpoints_averaged"] == [p.name for p in last_two]
    # The bundle's model equals the averaged checkpoint weights, output for output.
    reference = build_model("ctc", config["model"]["config"])
    reference.load_state_dict(ckpt.average_models(last_two))
    attach_cmvn(reference, bundle.cmvn)
    reference.eval()
    feats = torch.randn(2, 120, 80)
    lens = torch.tensor([120, 90])
    with torch.no_grad():
        a = bundle.model(feats, lens).log_probs
        b = reference(feats, lens).log_probs
    assert a is not None and b is not None and torch.equal(a, b)
    # ... and reproduces the dev numbers recorded at export.
    result = evaluate(
        bundle.model,
        read_manifest(corpus["manifest"]),
        bundle.tokenizer,
        bundle.feature_config,
        torch.device("cpu"),
        max_frames=700,
    )
    assert result.rates.wer == pytest.approx(config["results"]["dev"]["wer"])


DDP_WORKER = Path(__file__).with_name("ddp_worker.py")


def test_ddp_two_ranks_gloo(corpus: dict[str, Path], tmp_path: Path) -> None:
    experiment = _experiment(corpus, max_frames=400)
    (tmp_path / "experiment.json").write_text(json.dumps(experiment.to_dict()))
    torchrun = Path(sys.executable).with_name("torchrun")
    subprocess.run(
        [str(torchrun), "--standalone", "--nproc_per_node=2", str(DDP_WORKER), str(tmp_path)]
        + [str(corpus["tokenizer"]), str(corpus["cmvn"])],
        check=True,
        env=_env(),
        capture_output=True,
        timeout=300,
    )
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    ids = [set(r["ids"]) for r in ranks]
    assert ids[0] and ids[1] and not ids[0] & ids[1]
    assert ids[0] | ids[1] == {u.id for u in read_manifest(corpus["manifest"])} - set(
        ranks[0]["excluded"]
    )
    assert ranks[0]["steps"] == ranks[1]["steps"] > 0
    assert ranks[0]["weights"] == ranks[1]["weights"]


def test_init_transfers_matching_tensors_and_reports_the_rest(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    torch.manual_seed(0)
    source = build_model("las", model_config("las", "cpu-small", vocab_size=40).to_dict())
    save_file(source.state_dict(), str(tmp_path / "model.safetensors"))
    upsampled = model_config("las", "cpu-small", vocab_size=40, ctc_upsample=2)
    target = build_model("las", upsampled.to_dict())
    fresh = ckpt.transfer(target, ckpt.initial_weights(tmp_path))  # a bundle-like directory
    assert fresh == ["ctc.bias", "ctc.weight"]  # the 40 ms head predicts 2 x 40 outputs
    for name, value in target.state_dict().items():
        if name not in fresh:
            assert torch.equal(value, source.state_dict()[name]), name
    other = build_model("ctc", model_config("ctc", "cpu-small", vocab_size=40).to_dict())
    with pytest.raises(ValueError, match="share no tensor"):
        ckpt.transfer(other, ckpt.initial_weights(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="no model weights"):
        ckpt.initial_weights(tmp_path / "missing")
