"""The LSTM language model: its step interface, training on the shared Trainer, export, CLI."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
import torch

from asr.bundle import BundleError, load_lm_bundle
from asr.cli import main
from asr.language_model import load_language_model
from asr.models.lm import LSTMLM, LSTMLMConfig
from asr.quantize import QuantizationError
from asr.tokenizer import SOS_EOS_ID, Tokenizer
from asr.training.lm import (
    OverlapFilter,
    TextDataset,
    gcide_sentences,
    perplexity,
    read_gcide,
    read_sentences,
)

SENTENCES = ["THE CAT SAT ON THE MAT", "A DOG RAN IN THE PARK", "SHE READ A LONG BOOK"]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tok") / "tokenizer.model"
    Tokenizer.train(SENTENCES * 5, "char", 40).save(path)
    return path


def test_step_matches_whole_sentence_scoring() -> None:
    torch.manual_seed(0)
    model = LSTMLM(LSTMLMConfig(vocab_size=20, embed_dim=16, hidden_size=16)).eval()
    tokens = torch.tensor([[5, 6, 7, 0], [8, 9, 0, 0]])
    lengths = torch.tensor([3, 2])
    whole = model.sentence_log_probs(tokens, lengths)
    state = model.init_state(2)
    stepped = torch.zeros(2)
    for t in range(4):
        target = torch.where(t < lengths, tokens[:, t], SOS_EOS_ID)
        live = t <= lengths
        stepped += torch.where(live, state.log_probs.gather(1, target[:, None])[:, 0], 0.0)
        state = model.step(state, target)
    assert torch.allclose(stepped, whole, atol=1e-4)
    # Blank is never a unit of text.
    assert bool((state.log_probs[:, 0] == -float("inf")).all())


@pytest.mark.parametrize(
    "config",
    [
        LSTMLMConfig(vocab_size=20, embed_dim=16, hidden_size=16, num_layers=1),
        LSTMLMConfig(
            vocab_size=20, embed_dim=8, hidden_size=16, num_layers=3, tie_embeddings=False
        ),
    ],
    ids=["1-layer-tied", "3-layers-untied"],
)
def test_search_stepper_equals_step(config: LSTMLMConfig) -> None:
    torch.manual_seed(0)
    model = LSTMLM(config).eval()
    stepper = model.stepper()
    ref, fast = model.init_state(3), stepper.init_state(3)
    for tokens in ([5, 6, 7], [8, 8, 3], [2, 9, 11]):
        ids = torch.tensor(tokens)
        for a, b in ((ref.h, fast.h), (ref.c, fast.c), (ref.log_probs, fast.log_probs)):
            assert a.shape == b.shape
            assert torch.allclose(a, b, atol=1e-5)
        ref, fast = model.step(ref, ids), stepper(fast, ids)
    assert bool((fast.log_probs[:, 0] == -float("inf")).all())


def test_int8_stepper_is_close_to_float_and_keeps_blank_out() -> None:
    torch.manual_seed(0)
    config = LSTMLMConfig(vocab_size=20, embed_dim=32, hidden_size=32, num_layers=2)
    model = LSTMLM(config).eval()
    steppers = (model.stepper(), model.stepper("int8"))
    states = [s.init_state(4) for s in steppers]
    for tokens in ([5, 6, 7, 3], [8, 8, 3, 19], [2, 9, 11, 4]):
        ids = torch.tensor(tokens)
        states = [s(st, ids) for s, st in zip(steppers, states, strict=True)]
        ref, got = (st.log_probs for st in states)
        assert bool((got[:, 0] == -float("inf")).all())
        assert got.dtype == torch.float32 and bool(torch.isfinite(got[:, 1:]).all())
        # int8 weights: the distribution moves by a little (quantized, so not bit-equal).
        assert 0 < float((ref.exp() - got.exp()).abs().max()) < 0.02
    with pytest.raises(QuantizationError, match="unknown quantization 'int4'"):
        model.stepper("int4")


def test_read_sentences_drops_ids_and_reads_manifests(tmp_path: Path) -> None:
    text = tmp_path / "text.txt"
    text.write_text("1089-134686-0000 he hoped\n\nplain sentence, here\n")
    assert read_sentences(text) == ["HE HOPED", "PLAIN SENTENCE HERE"]
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps({"id": "a", "text": "ONE TWO"}) + "\n")
    assert read_sentences(manifest) == ["ONE TWO"]
    (tmp_path / "bad.jsonl").write_text("{not json\n")
    with pytest.raises(ValueError, match=r"bad\.jsonl:1"):
        read_sentences(tmp_path / "bad.jsonl")
    with pytest.raises(FileNotFoundError):
        read_sentences(tmp_path / "missing.txt")


# Entries in GCIDE's markup (made up, so no dictionary text is copied here): pronunciations
# with stress marks, run-on forms, etymologies over two lines, labels, numbered senses, a
# quotation with its author, a synonym list.
GCIDE = """Lanternist \\Lan"tern*ist\\, n. [From lantern, with the suffix
   -ist.] (Optics)
   1. One who carries a lantern through the streets at night; a
      watchman of the old town. "The lanternist went slowly down
      the hill with his light." --Old Play.
      [1913 Webster] -- {Lan"tern*ist*ly}, adv.

   Syn: Watchman; guard; sentinel.
        [1913 Webster]

Lanternwise   ([l^]an"t[~e]rn*w[imac]z`), adv.
   In the manner of a lantern; with a steady glow.
   [1913 Webster]
"""


def test_gcide_sentences_keep_the_prose_and_drop_the_markup(tmp_path: Path) -> None:
    assert gcide_sentences(GCIDE) == [
        "ONE WHO CARRIES A LANTERN THROUGH THE STREETS AT NIGHT",
        "A WATCHMAN OF THE OLD TOWN",
        "THE LANTERNIST WENT SLOWLY DOWN THE HILL WITH HIS LIGHT",
        "IN THE MANNER OF A LANTERN",
        "WITH A STEADY GLOW",
    ]
    packed = tmp_path / "gcide.dict.dz"  # dictd's format is gzip-compatible
    packed.write_bytes(gzip.compress(GCIDE.encode()))
    assert read_gcide(packed) == gcide_sentences(GCIDE)
    (tmp_path / "other.txt").write_text("NO PROSE HERE\n")
    with pytest.raises(ValueError, match=r"other\.txt: no sentences"):
        read_gcide(tmp_path / "other.txt")
    with pytest.raises(FileNotFoundError, match="dict-gcide"):
        read_gcide(tmp_path / "missing.dict.dz")


def test_overlap_filter_drops_sentences_that_quote_an_excluded_one() -> None:
    excluded = ["HE WENT DOWN TO THE RIVER AT DAWN", "YES"]
    exact = OverlapFilter(excluded)
    assert not exact("YES") and not exact("HE WENT DOWN TO THE RIVER AT DAWN")
    assert exact("AND THEN HE WENT DOWN TO THE RIVER AT DAWN AGAIN")
    runs = OverlapFilter(excluded, n=4)
    assert not runs("AND THEN HE WENT DOWN TO THE RIVER AT DAWN AGAIN")
    assert not runs("SHE SAID THE RIVER AT DAWN WAS COLD")  # four words in a row
    assert runs("HE WENT DOWN INTO TOWN") and runs("THE RIVER AT NOON")  # three at most
    assert not runs("YES") and runs("YES INDEED")  # shorter than n: only equal ones


def test_lm_text_reads_gcide_and_excludes_overlaps(tmp_path: Path) -> None:
    gcide = tmp_path / "gcide.dict.dz"
    gcide.write_bytes(gzip.compress(GCIDE.encode()))
    train = tmp_path / "train.txt"
    train.write_text("THE CAT SAT\n")
    test = tmp_path / "test.txt"
    test.write_text("WENT SLOWLY DOWN THE HILL\n")
    out = tmp_path / "text.txt"
    args = ["lm", "text", str(train), "--gcide", str(gcide), "--exclude", str(test)]
    assert main([*args, "--exclude-overlap", "4", "--out", str(out)]) == 0
    assert out.read_text().splitlines() == [
        "THE CAT SAT",
        "ONE WHO CARRIES A LANTERN THROUGH THE STREETS AT NIGHT",
        "A WATCHMAN OF THE OLD TOWN",
        "IN THE MANNER OF A LANTERN",
        "WITH A STEADY GLOW",
    ]
    assert main(["lm", "text", "--out", str(out)]) != 0  # no input at all


def test_lm_overfits_a_few_sentences_then_exports(tmp_path: Path, tokenizer: Path) -> None:
    text = tmp_path / "train.txt"
    text.write_text("\n".join(SENTENCES) + "\n")
    exp, out = tmp_path / "exp", tmp_path / "lm"
    common = ["--tokenizer", str(tokenizer), "--train", str(text), "--dev", str(text)]
    sizes = ["--model-set", "embed_dim=64", "--model-set", "hidden_size=64"]
    # dropout is the model's, not training's: a clear error, exit 2
    assert (
        main(
            [
                "lm",
                "train",
                "--exp-dir",
                str(exp),
                "--preset",
                "cpu-small",
                *common,
                "--set",
                "dropout=0.0",
            ]
        )
        == 2
    )
    assert (
        main(
            [
                "lm",
                "train",
                "--exp-dir",
                str(exp),
                "--preset",
                "cpu-small",
                "--epochs",
                "150",
                "--no-progress",
                *common,
                *sizes,
                "--model-set",
                "dropout=0.0",
                "--set",
                "warmup_steps=5",
                "--set",
                "lr=0.01",
            ]
        )
        == 0
    )
    history = [json.loads(line) for line in (exp / "metrics.jsonl").read_text().splitlines()]
    final = [r for r in history if "perplexity" in r][-1]
    # Three memorised sentences: each next character is nearly certain (a margin, not an edge).
    assert final["perplexity"] < 1.5
    assert main(["lm", "export", "--exp-dir", str(exp), "--out", str(out)]) == 0
    bundle = load_lm_bundle(out)
    assert bundle.perplexity is not None and bundle.perplexity < 1.5
    data = TextDataset(SENTENCES, bundle.tokenizer)
    assert perplexity(bundle.model, data)["perplexity"] == pytest.approx(bundle.perplexity)
    assert main(["lm", "perplexity", "--lm", str(out), "--text", str(text)]) == 0
    # Loaded for fusion with `quantize="int8"` (what `--quantize int8` passes), it steps on
    # int8 weights: next-unit scores close to the float LM's, not the same.
    scores = []
    for kind in ("none", "int8"):
        scorer = load_language_model(out, bundle.tokenizer, quantize=kind).scorer
        state = scorer.advance(scorer.init(2, "cpu"), torch.arange(2), torch.tensor([5, 9]))
        scores.append(scorer.scores(state).exp())
    assert 0 < float((scores[0] - scores[1]).abs().max()) < 0.05


def test_load_lm_bundle_errors(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="not found"):
        load_lm_bundle(tmp_path / "none")
    (tmp_path / "b").mkdir()
    with pytest.raises(BundleError, match="missing"):
        load_lm_bundle(tmp_path / "b")


def test_cli_rejects_unknown_preset(
    tmp_path: Path, tokenizer: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    text = tmp_path / "t.txt"
    text.write_text("A B\n")
    code = main(
        [
            "lm",
            "train",
            "--exp-dir",
            str(tmp_path / "e"),
            "--preset",
            "huge",
            "--train",
            str(text),
            "--dev",
            str(text),
            "--tokenizer",
            str(tokenizer),
        ]
    )
    assert code == 2
    assert "unknown LM preset 'huge'" in capsys.readouterr().err


def test_lm_training_resumes_exactly(tmp_path: Path, tokenizer: Path) -> None:
    text = tmp_path / "train.txt"
    text.write_text("\n".join(SENTENCES * 4) + "\n")
    args = [
        "--preset",
        "cpu-small",
        "--tokenizer",
        str(tokenizer),
        "--train",
        str(text),
        "--dev",
        str(text),
        "--epochs",
        "3",
        "--no-progress",
        "--model-set",
        "embed_dim=32",
        "--model-set",
        "hidden_size=32",
        "--set",
        "max_frames=100",
        "--set",
        "log_every=1",
    ]

    def losses(exp: Path) -> list[float]:
        lines = (exp / "metrics.jsonl").read_text().splitlines()
        return [r["loss"] for r in map(json.loads, lines) if "loss" in r]

    assert main(["lm", "train", "--exp-dir", str(tmp_path / "whole"), *args]) == 0
    split = tmp_path / "split"
    assert main(["lm", "train", "--exp-dir", str(split), "--max-steps", "5", *args]) == 0
    assert main(["lm", "train", "--exp-dir", str(split), *args]) == 0
    whole = losses(tmp_path / "whole")
    assert len(whole) > 5
    assert losses(split) == pytest.approx(whole)
