"""The CUDA paths, for `make gpu-check` on a machine with a GPU (skipped without one): a training
step of each model under AMP (bf16, and fp16 with a GradScaler), DDP over NCCL with torchrun,
checkpoint resume on CUDA, export from a CUDA checkpoint and a CPU load of the bundle, and every
decoding method on CUDA against the same on CPU."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch

from asr.audio import AudioInput
from asr.bundle import Bundle, load_bundle
from asr.decoding.options import DecodeOptions
from asr.models import build_model, model_config
from asr.recognizer import Recognizer
from asr.tokenizer import Tokenizer
from asr.training import checkpoint as ckpt
from asr.training.export import export_experiment
from asr.training.trainer import Experiment, Trainer
from tests.test_training import DDP_WORKER, _experiment, _losses, _train_cmd
from tests.word_corpus import WordCorpus, untrained_las

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"),
]


def _las_experiment(corpus: dict[str, Path], **train: Any) -> Experiment:
    vocab = Tokenizer.load(corpus["tokenizer"]).vocab_size
    config = model_config(
        "las", "cpu-small", vocab_size=vocab, listener_hidden=32, attention_dim=32,
        speller_hidden=32, embedding_dim=16, ctc_weight=0.3,
    )  # fmt: skip
    return replace(_experiment(corpus, **train), model_type="las", model_config=config.to_dict())


@pytest.mark.parametrize("kind", ["ctc", "las"])
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_training_steps_under_amp(
    corpus: dict[str, Path], kind: str, precision: str, tmp_path: Path
) -> None:
    make = _experiment if kind == "ctc" else _las_experiment
    trainer = Trainer(
        tmp_path / "exp",
        make(corpus, precision=precision, epochs=2, log_every=1),
        corpus["tokenizer"],
        corpus["cmvn"],
        device="cuda",
        progress=False,
    )
    assert trainer.amp_dtype == {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    assert trainer.scaler.is_enabled() == (precision == "fp16")
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.train()
    assert trainer.step > 0 and trainer.skipped_batches < trainer.step
    assert all(p.is_cuda and p.dtype == torch.float32 for p in trainer.model.parameters())
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
    changed = [k for k, v in trainer.model.state_dict().items() if not torch.equal(v, before[k])]
    assert changed, "no weight moved"
    losses = _losses(tmp_path / "exp")
    assert len(losses) == trainer.step and all(v < float("inf") for v in losses.values())


def test_ddp_over_nccl(corpus: dict[str, Path], tmp_path: Path) -> None:
    gpus = torch.cuda.device_count()
    (tmp_path / "experiment.json").write_text(json.dumps(_experiment(corpus).to_dict()))
    torchrun = Path(sys.executable).with_name("torchrun")
    done = subprocess.run(
        [str(torchrun), "--standalone", f"--nproc_per_node={gpus}", str(DDP_WORKER)]
        + [str(tmp_path), str(corpus["tokenizer"]), str(corpus["cmvn"])],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(gpus)]
    assert all(r["backend"] == "nccl" for r in ranks)
    assert len({r["weights"] for r in ranks}) == 1  # DDP kept the replicas identical
    seen = [set(r["ids"]) for r in ranks]
    assert sum(map(len, seen)) == len(set().union(*seen))  # each utterance on one rank


def test_resume_on_cuda_and_export_loads_on_cpu(corpus: dict[str, Path], tmp_path: Path) -> None:
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    for exp, steps in ((whole, 10), (resumed, 6), (resumed, 10)):
        cmd = _train_cmd(corpus, exp, "--max-steps", str(steps), "--device", "cuda")
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
    state = torch.load(ckpt.list_checkpoints(resumed)[-1], weights_only=True)
    assert "cuda" in state["rng"]  # the CUDA generator is restored on resume
    # cuDNN's RNN kernels are not bit-reproducible, so the resumed run's losses match the
    # uninterrupted run's closely rather than exactly (on CPU they are equal: test_training).
    a, b = _losses(whole), _losses(resumed)
    assert sorted(a) == sorted(b) == list(range(1, 11))
    assert all(b[s] == pytest.approx(a[s], rel=1e-2, abs=1e-2) for s in a)

    bundle_dir = export_experiment(resumed, tmp_path / "bundle", average=2)
    on_cpu, on_gpu = load_bundle(bundle_dir), load_bundle(bundle_dir, device="cuda")
    assert all(p.device.type == "cpu" for p in on_cpu.model.parameters())
    feats, lens = torch.randn(2, 160, 80), torch.tensor([160, 120])
    with torch.no_grad():
        cpu = on_cpu.model(feats, lens).log_probs
        gpu = on_gpu.model(feats.cuda(), lens.cuda()).log_probs
    assert cpu is not None and gpu is not None
    torch.testing.assert_close(gpu.cpu(), cpu, atol=1e-3, rtol=1e-3)


def _on(bundle: Bundle, device: str) -> Bundle:
    """A copy of `bundle` with its model on `device`."""
    config = bundle.model.config.to_dict()  # type: ignore[union-attr, operator]
    model = build_model(bundle.model_type, config)
    model.load_state_dict(bundle.model.state_dict())
    return replace(bundle, model=model.to(device).eval())


def test_every_decoding_method_on_cuda_equals_cpu(
    word_model: Bundle, word_corpus: WordCorpus
) -> None:
    rng = random.Random(21)
    audio: list[AudioInput] = [word_corpus.utterance(rng).audio for _ in range(4)]
    # An untrained LAS with a CTC head: arbitrary but well-formed outputs, every method runs.
    las = untrained_las(word_model, word_model.tokenizer)
    torch.manual_seed(0)
    las = replace(las, model=build_model("las", {**las.model.config.to_dict(), "ctc_weight": 0.3}))  # type: ignore[union-attr, operator]
    cases: list[tuple[Bundle, Bundle | None, str]]
    cases = [(word_model, las, m) for m in ("greedy", "beam", "rescore", "joint")]
    cases += [(las, None, m) for m in ("greedy", "beam", "joint", "rescore")]
    for bundle, rescorer, method in cases:
        options = DecodeOptions(method=method, beam=4, nbest=2)
        found = {}
        for device in ("cpu", "cuda"):
            second = _on(rescorer, device) if rescorer else None
            found[device] = Recognizer(_on(bundle, device), options, second).transcribe(audio)
        for gpu, cpu in zip(found["cuda"], found["cpu"], strict=True):
            # Equal, or where float rounding flips a near-tie of the untrained LAS, as good.
            assert gpu.score == pytest.approx(cpu.score, rel=1e-3, abs=1e-3), (bundle, method)
            if bundle is word_model and method in ("greedy", "beam"):  # trained with a margin
                assert gpu.text == cpu.text
                assert [w.word for w in gpu.words] == [w.word for w in cpu.words]
