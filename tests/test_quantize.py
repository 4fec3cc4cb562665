"""int8 inference (asr.quantize): close to the float model, every code path still runs, errors
name what to do."""

from __future__ import annotations

import random
from dataclasses import replace
from pathlib import Path

import pytest
import soundfile as sf
import torch

from asr import load_model
from asr.bundle import Bundle
from asr.cli import main
from asr.metrics import error_rates
from asr.models.base import model_device
from asr.models.bilstm_ctc import BiLSTMCTCStream
from asr.models.las import LAS
from asr.quantize import QuantizationError, quantize_model
from asr.recognizer import Recognizer
from server.config import ServerConfig
from tests.test_bilstm_ctc import tiny
from tests.test_las import TINY as TINY_LAS
from tests.word_corpus import WordCorpus, save_bundle

SAMPLE_RATE = 16000


def test_int8_ctc_model_is_close_and_streams() -> None:
    model = tiny()
    int8 = quantize_model(model, "int8")
    assert model_device(int8) == torch.device("cpu")  # no float parameters left to ask
    feats = torch.randn(2, 300, 20)
    lengths = torch.tensor([300, 170])
    with torch.no_grad():
        ref, ref_lens = model.log_probs(feats, lengths)
        got, got_lens = int8.log_probs(feats, lengths)
    assert torch.equal(ref_lens, got_lens)
    # int8 weights and activations: probabilities move by a little, not by a lot.
    valid = torch.arange(ref.shape[1])[None] < ref_lens[:, None]
    assert float((ref.exp() - got.exp()).abs()[valid].max()) < 0.05
    # The latency-controlled stream runs on the int8 layers too. Activations are quantized
    # with each call's own range, so a block alone is close to, not bit-equal to, the block
    # inside the whole utterance's pass.
    stream = BiLSTMCTCStream(int8)
    pieces = [stream.accept(feats[:1, i : i + 37]) for i in range(0, 300, 37)]
    streamed = torch.cat([*pieces, stream.flush()], dim=1)
    assert streamed.shape == got[:1].shape
    assert float((streamed.exp() - got[:1].exp()).abs().max()) < 0.05


def test_int8_las_encodes_and_steps_close_to_float() -> None:
    torch.manual_seed(0)
    model = LAS(TINY_LAS).eval()
    int8 = quantize_model(model, "int8")
    feats = torch.randn(2, 120, TINY_LAS.input_dim)
    lengths = torch.tensor([120, 90])
    tokens = torch.full((2,), 2, dtype=torch.long)
    with torch.no_grad():
        outs = []
        for m in (model, int8):
            enc = m.encode(feats, lengths)
            log_probs, _ = m.step(enc, m.init_state(enc), tokens)
            outs.append(log_probs)
    assert float((outs[0].exp() - outs[1].exp()).abs().max()) < 0.05


def test_int8_word_model_recognises_as_well(word_model: Bundle, word_corpus: WordCorpus) -> None:
    utterances = [word_corpus.utterance(random.Random(seed)) for seed in range(12)]
    refs = [" ".join(w for w, _, _ in u.words) for u in utterances]
    int8 = replace(word_model, model=quantize_model(word_model.model, "int8"))
    rates = {}
    for name, bundle in (("float", word_model), ("int8", int8)):
        hyps = [t.text for t in Recognizer(bundle).transcribe([u.audio for u in utterances])]
        rates[name] = error_rates(refs, hyps).wer
    # The trained model has a margin on these words; int8 may cost a little of it, not more.
    assert rates["int8"] <= rates["float"] + 10.0, rates


def test_quantize_cli_and_errors(
    word_model: Bundle,
    word_corpus: WordCorpus,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    bundle_dir = save_bundle(word_model, tmp_path / "bundle")
    utterance = word_corpus.utterance(random.Random(0))
    wav = tmp_path / "a.wav"
    sf.write(wav, utterance.audio.numpy(), SAMPLE_RATE)
    assert main(["transcribe", "--model", str(bundle_dir), "--quantize", "int8", str(wav)]) == 0
    assert capsys.readouterr().out.strip()
    assert load_model(bundle_dir, quantize="int8").transcribe(str(wav)).text
    # CUDA has no int8 kernels here: refused before anything loads, naming the way out.
    with pytest.raises(QuantizationError, match="CPU only"):
        load_model(bundle_dir, "cuda", quantize="int8")
    with pytest.raises(QuantizationError, match="unknown quantization 'int4'"):
        quantize_model(word_model.model, "int4")
    with pytest.raises(ValueError, match="unknown quantization"):
        ServerConfig(models=(("m", str(bundle_dir)),), quantize="int4")
    code = main(
        [
            "transcribe",
            "--model",
            str(bundle_dir),
            "--quantize",
            "int8",
            "--device",
            "cuda",
            str(wav),
        ]
    )
    assert code != 0
    assert "CPU only" in capsys.readouterr().err
