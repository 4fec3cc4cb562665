"""Word confidence calibration: ECE on hand-computed cases, the fit recovering a known
miscalibration, correctness labels from the word alignment, calibration stored in a bundle and
applied by the recognizer (batch, streamed and at export), and bundles without one unchanged."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from asr.bundle import Bundle, BundleError, load_bundle, write_bundle
from asr.calibration import Calibration, expected_calibration_error, fit, word_labels
from asr.data.manifest import Utterance
from asr.decoding.alignment import word_timings
from asr.decoding.options import DecodeOptions, Hypothesis, Transcript, WordTiming
from asr.evaluation import confidence_scores, decode_line, score_decode, spread
from asr.features import CMVN, FeatureConfig
from asr.language_model import DEFAULT_LM_WEIGHT, load_language_model
from asr.metrics import error_rates
from asr.models.bilstm_ctc import BiLSTMCTC, BiLSTMCTCConfig
from asr.models.ngram import write_arpa
from asr.recognizer import Posteriors, Recognizer
from asr.streaming import StreamingSession
from asr.tokenizer import Tokenizer
from asr.training import checkpoint as ckpt
from asr.training.config import TrainConfig
from asr.training.export import export_experiment
from asr.training.trainer import Experiment
from tests.word_corpus import TRAINING, WordCorpus, save_bundle, write_clips_manifest


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1 / (1 + np.exp(-z))


def _logit(p: np.ndarray) -> np.ndarray:
    return np.log(p / (1 - p))


# ---------------------------------------------------------------------------------------------
# Expected calibration error


def test_ece_of_hand_computed_bins() -> None:
    # Bins [0, 0.1): 0.05 vs 0 right; [0.1, 0.2): 0.15 vs 0; [0.9, 1]: 0.95 vs 1 of 2 right.
    ece = expected_calibration_error([0.05, 0.15, 0.95, 0.95], [False, False, True, False])
    assert ece == pytest.approx((0.05 + 0.15 + 2 * 0.45) / 4)
    # A bin whose mean confidence is its accuracy costs nothing; 1.0 falls in the last bin.
    assert expected_calibration_error([0.25] * 4, [True, False, False, False]) == 0.0
    assert expected_calibration_error([1.0, 1.0], [True, True]) == 0.0
    assert expected_calibration_error([0.0, 1.0], [True, False]) == 1.0
    # One bin: |mean confidence - accuracy|.
    assert expected_calibration_error([0.2, 0.9], [True, True], bins=1) == pytest.approx(0.45)


def test_ece_rejects_what_it_cannot_measure() -> None:
    with pytest.raises(ValueError, match="no confidences"):
        expected_calibration_error([], [])
    with pytest.raises(ValueError, match="2 confidences but 1 labels"):
        expected_calibration_error([0.5, 0.5], [True])
    with pytest.raises(ValueError, match="bins"):
        expected_calibration_error([0.5], [True], bins=0)


# ---------------------------------------------------------------------------------------------
# Fitting


def _synthetic(
    rng: np.random.Generator, a: float, b: float, bias: float, utterances: int = 3000
) -> tuple[list[list[float]], list[list[bool]]]:
    """Raw confidences of overconfident words, rounded as alignment rounds them, and labels
    drawn with p = sigmoid(a * logit(c) + b * logit(mean c of the utterance) + bias)."""
    raw, labels = [], []
    for _ in range(utterances):
        quality = rng.uniform(0.5, 6.0)  # how sure the model is of the whole utterance
        c = np.round(rng.beta(quality, 1.0, size=rng.integers(1, 8)), 4).clip(0.001, 0.999)
        p = _sigmoid(a * _logit(c) + b * _logit(np.full_like(c, c.mean())) + bias)
        raw.append(c.tolist())
        labels.append((rng.random(len(c)) < p).tolist())
    return raw, labels


def _ece(confidences: list[list[float]], labels: list[list[bool]]) -> float:
    return expected_calibration_error(
        [c for cs in confidences for c in cs], [y for ys in labels for y in ys]
    )


def test_fit_recovers_a_known_miscalibration_and_lowers_ece() -> None:
    rng = np.random.default_rng(0)
    raw, labels = _synthetic(rng, a=2.0, b=0.5, bias=-3.0)
    calibration = fit(raw, labels)
    assert calibration.word_weight == pytest.approx(2.0, abs=0.25)
    assert calibration.utterance_weight == pytest.approx(0.5, abs=0.25)
    assert calibration.bias == pytest.approx(-3.0, abs=0.5)
    # Held-out draws of the same process: calibrated within sampling noise, raw far off.
    test_raw, test_labels = _synthetic(rng, a=2.0, b=0.5, bias=-3.0)
    before = _ece(test_raw, test_labels)
    after = _ece([calibration.confidences(c) for c in test_raw], test_labels)
    assert before > 0.2 and after < 0.03


def test_fit_keeps_the_order_of_words() -> None:
    rng = np.random.default_rng(1)
    # A process in which a worse utterance would make its words more likely right: no
    # order-keeping calibration has a negative utterance weight, so it is fixed at 0.
    raw, labels = _synthetic(rng, a=1.5, b=-1.0, bias=0.0)
    calibration = fit(raw, labels)
    assert calibration.utterance_weight == 0.0 and calibration.word_weight > 0
    # Confidence that does not rank right words above wrong ones fits nothing.
    raw, labels = _synthetic(rng, a=2.0, b=0.0, bias=0.0)
    with pytest.raises(ValueError, match="keeps their order"):
        fit(raw, [[not y for y in ys] for ys in labels])
    with pytest.raises(ValueError, match="no words"):
        fit([[], []], [[], []])


def test_fit_on_few_words_stays_near_the_identity_and_finite_when_all_are_right() -> None:
    calibration = fit([[0.9, 0.8], [0.95]], [[True, True], [True]])
    assert all(map(math.isfinite, (calibration.bias, calibration.word_weight)))
    assert calibration.word_weight == pytest.approx(1.0, abs=0.3)
    assert calibration.confidences([0.9, 0.8]) > [0.9, 0.8]  # all right: more confident


def test_calibration_keeps_word_order_within_an_utterance() -> None:
    calibration = Calibration(word_weight=2.3, utterance_weight=0.6, bias=-4.0)
    rng = random.Random(3)
    for _ in range(200):
        raw = [round(rng.random(), 4) for _ in range(rng.randint(1, 12))]
        calibrated = calibration.confidences(raw)
        assert all(0.0 <= p <= 1.0 for p in calibrated)
        by_raw = sorted(range(len(raw)), key=lambda i: raw[i])
        assert [calibrated[i] for i in by_raw] == sorted(calibrated)
    with pytest.raises(ValueError, match="word_weight must be > 0"):
        Calibration(word_weight=0.0)
    with pytest.raises(ValueError, match="utterance_weight must be >= 0"):
        Calibration(utterance_weight=-0.1)


# ---------------------------------------------------------------------------------------------
# Which words are right


def test_word_labels_follow_the_levenshtein_alignment() -> None:
    ref = "THE CAT SAT DOWN"
    assert word_labels(ref, ["THE", "BAT", "SAT", "DOWN"]) == [True, False, True, True]  # sub
    assert word_labels(ref, ["THE", "BIG", "CAT", "SAT", "DOWN"]) == [  # insertion
        True,
        False,
        True,
        True,
        True,
    ]
    assert word_labels(ref, ["THE", "SAT", "DOWN"]) == [True, True, True]  # deletion
    assert word_labels(ref, ["A", "CAT", "SAT"]) == [False, True, True]  # sub + deletion
    assert word_labels(ref, []) == []
    assert word_labels("", ["CAT"]) == [False]  # nothing was said
    # Normalised as WER is: case and punctuation are no errors; a word that normalises to
    # nothing is an insertion, one that normalises to two is right only if both are.
    assert word_labels("It's the cat.", ["it's", "THE", "Cat!"]) == [True, True, True]
    assert word_labels("THE CAT", ["THE", "--", "CAT"]) == [True, False, True]
    assert word_labels("THE CAT SAT", ["THE", "CAT-SAT"]) == [True, True]
    assert word_labels("THE CAT SAT", ["THE", "CAT-MAT"]) == [True, False]


# ---------------------------------------------------------------------------------------------
# Stored in the bundle, applied by the recognizer

WORDS = ("APPLE", "RIVER", "TIGER", "GARDEN")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Calibration]:
    """An untrained tiny BiLSTM-CTC as two bundles: without and with a calibration."""
    torch.manual_seed(0)
    tokenizer = Tokenizer.train(list(WORDS) * 4, "char", 32)
    config = BiLSTMCTCConfig(vocab_size=tokenizer.vocab_size, hidden_size=16, num_layers=1)
    model = BiLSTMCTC(config)
    dims = FeatureConfig().num_mel_bins
    cmvn = CMVN(mean=(0.0,) * dims, std=(1.0,) * dims, frames=1)
    calibration = Calibration(word_weight=2.0, utterance_weight=0.5, bias=-3.5)
    dirs = []
    for name, cal in (("raw", None), ("calibrated", calibration)):
        dirs.append(
            write_bundle(
                tmp_path_factory.mktemp(name) / "bundle",
                model_type="ctc",
                model_config=config.to_dict(),
                weights=model.state_dict(),
                tokenizer=tokenizer,
                cmvn=cmvn,
                feature_config=FeatureConfig(),
                training=TRAINING,
                results={},
                calibration=cal,
            )
        )
    return dirs[0], dirs[1], calibration


def _transcript(rec: Recognizer, seed: int) -> Transcript:
    """The recognizer's transcript of WORDS over random posteriors (40 ms frames)."""
    generator = torch.Generator().manual_seed(seed)
    log_probs = torch.randn(1, 80, rec.bundle.tokenizer.vocab_size, generator=generator) * 3
    ctc = Posteriors(log_probs.log_softmax(-1), torch.tensor([80]), 4)
    tokens = tuple(rec.bundle.tokenizer.encode(" ".join(WORDS)))
    return rec.transcript([Hypothesis(tokens, -1.0)], DecodeOptions(), ctc, 0, None)


def test_bundle_without_calibration_reports_todays_confidences(
    tiny: tuple[Path, Path, Calibration],
) -> None:
    raw_dir, _, _ = tiny
    config = json.loads((raw_dir / "config.json").read_text())
    assert "calibration" not in config
    rec = Recognizer(load_bundle(raw_dir))
    assert rec.calibration is None
    t = _transcript(rec, seed=0)
    generator = torch.Generator().manual_seed(0)
    log_probs = (torch.randn(1, 80, rec.bundle.tokenizer.vocab_size, generator=generator) * 3)[0]
    tokens = rec.bundle.tokenizer.encode(" ".join(WORDS))
    today = word_timings(log_probs.log_softmax(-1), tokens, rec.bundle.tokenizer, 0.01, 4)
    assert t.words == today and [w.word for w in t.words] == list(WORDS)
    assert t.confidence == round(sum(w.confidence for w in today) / len(today), 4)
    rows = t.to_dict()["words"]
    assert isinstance(rows, list) and all("raw_confidence" not in w for w in rows)


def test_bundle_with_calibration_round_trips_and_maps_confidences_monotonically(
    tiny: tuple[Path, Path, Calibration],
) -> None:
    raw_dir, calibrated_dir, calibration = tiny
    stored = json.loads((calibrated_dir / "config.json").read_text())["calibration"]
    assert stored == {"version": 1, "method": "platt"} | calibration.to_dict()
    bundle = load_bundle(calibrated_dir)
    assert bundle.calibration == calibration
    plain, calibrated = Recognizer(load_bundle(raw_dir)), Recognizer(bundle)
    assert calibrated.calibration == calibration
    for seed in range(5):
        a, b = _transcript(plain, seed), _transcript(calibrated, seed)
        raw = [w.confidence for w in a.words]
        assert [w.raw_confidence for w in b.words] == raw
        assert [w.confidence for w in b.words] == calibration.confidences(raw)
        assert [(w.word, w.start, w.end) for w in b.words] == [
            (w.word, w.start, w.end) for w in a.words
        ]
        order = sorted(range(len(raw)), key=lambda i: raw[i])
        assert [b.words[i].confidence for i in order] == sorted(w.confidence for w in b.words)
        assert b.confidence == round(sum(w.confidence for w in b.words) / len(b.words), 4)
        assert b.text == a.text and b.tokens == a.tokens
        row = b.to_dict()["words"][0]  # type: ignore[index]
        assert row["raw_confidence"] == raw[0]
    # Calibrating calibrated words again starts from their raw confidences.
    assert calibration.apply(b.words) == b.words


def test_a_bundle_with_an_unknown_calibration_is_refused(
    tiny: tuple[Path, Path, Calibration], tmp_path: Path
) -> None:
    _, calibrated_dir, _ = tiny
    for entry, message in (
        ({"version": 2, "method": "platt", "word_weight": 1.0}, "version 2"),
        ({"version": 1, "method": "platt", "word_weight": -1.0}, "word_weight must be > 0"),
        ({"version": 1, "method": "platt", "slope": 1.0}, "unknown Calibration fields"),
    ):
        copy = tmp_path / f"bundle-{len(message)}"
        copy.mkdir()
        for f in calibrated_dir.iterdir():
            (copy / f.name).write_bytes(f.read_bytes())
        config = json.loads((copy / "config.json").read_text())
        (copy / "config.json").write_text(json.dumps(config | {"calibration": entry}))
        with pytest.raises(BundleError, match=message):
            load_bundle(copy)


def test_a_bad_lm_calibration_is_refused_at_load(
    tiny: tuple[Path, Path, Calibration], tmp_path: Path
) -> None:
    _, calibrated_dir, _ = tiny
    copy = tmp_path / "bundle"
    copy.mkdir()
    for f in calibrated_dir.iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    config = json.loads((copy / "config.json").read_text())
    entry = {"version": 1, "method": "platt", "word_weight": 0.0}
    (copy / "config.json").write_text(json.dumps(config | {"lm_calibration": entry}))
    with pytest.raises(BundleError, match=r"lm_calibration: .*word_weight must be > 0"):
        load_bundle(copy)


@pytest.fixture(scope="module")
def both(
    tiny: tuple[Path, Path, Calibration], tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, Path, Calibration]:
    """The tiny model with both calibrations, and a word 3-gram over its words."""
    raw_dir, _, calibration = tiny
    raw = load_bundle(raw_dir)
    lm_calibration = Calibration(word_weight=0.5, utterance_weight=1.0, bias=1.5)
    arpa = write_arpa([" ".join(WORDS)] * 3, tmp_path_factory.mktemp("lm") / "lm.arpa")
    out = save_bundle(
        raw,
        tmp_path_factory.mktemp("both") / "bundle",
        calibration=calibration,
        lm_calibration=lm_calibration,
        lm_fingerprint=load_language_model(arpa, raw.tokenizer).fingerprint,
    )
    return out, arpa, lm_calibration


def test_lm_fused_transcripts_get_the_lm_calibration(
    tiny: tuple[Path, Path, Calibration], both: tuple[Path, Path, Calibration]
) -> None:
    _, _, calibration = tiny
    bundle_dir, arpa, lm_calibration = both
    stored = json.loads((bundle_dir / "config.json").read_text())
    sha = hashlib.sha256(arpa.read_bytes()).hexdigest()
    assert stored["lm_calibration"] == {"version": 1, "method": "platt"} | (
        lm_calibration.to_dict() | {"lm_sha256": sha}
    )
    bundle = load_bundle(bundle_dir)
    assert (bundle.calibration, bundle.lm_calibration) == (calibration, lm_calibration)
    assert bundle.lm_fingerprint == sha
    # The same LM under another name is the same LM.
    lm = load_language_model(shutil.copy(arpa, arpa.with_name("copy.arpa")), bundle.tokenizer)
    fused, plain = Recognizer(bundle, lm=lm), Recognizer(bundle)
    on, off = DecodeOptions(lm_weight=0.5), DecodeOptions(lm_weight=0.0)
    assert fused.calibration_for(on) == lm_calibration
    assert fused.calibration_for(off) == calibration  # weight 0: no LM in the search
    assert plain.calibration_for(on) == calibration  # no LM to fuse
    for rec, options, expected in ((fused, on, lm_calibration), (fused, off, calibration)):
        generator = torch.Generator().manual_seed(3)
        log_probs = torch.randn(1, 80, bundle.tokenizer.vocab_size, generator=generator) * 3
        ctc = Posteriors(log_probs.log_softmax(-1), torch.tensor([80]), 4)
        tokens = tuple(bundle.tokenizer.encode(" ".join(WORDS)))
        t = rec.transcript([Hypothesis(tokens, -1.0)], options, ctc, 0, None)
        raw = [w.raw_confidence for w in t.words if w.raw_confidence is not None]
        assert len(raw) == len(t.words) == len(WORDS)
        assert [w.confidence for w in t.words] == expected.confidences(raw)


@pytest.mark.parametrize("case", ["no LM calibration", "another LM's"])
def test_an_lm_without_its_calibration_leaves_fused_words_raw(
    tiny: tuple[Path, Path, Calibration],
    both: tuple[Path, Path, Calibration],
    caplog: pytest.LogCaptureFixture,
    tmp_path: Path,
    case: str,
) -> None:
    _, calibrated_dir, calibration = tiny
    both_dir, arpa, _ = both
    bundle_dir = calibrated_dir if case == "no LM calibration" else both_dir
    if case == "another LM's":  # the same words, other counts: another file, another LM
        arpa = write_arpa([" ".join(WORDS), "APPLE RIVER"], tmp_path / "other.arpa")
    bundle = load_bundle(bundle_dir)
    with caplog.at_level(logging.WARNING, logger="asr.recognizer"):
        rec = Recognizer(bundle, lm=load_language_model(arpa, bundle.tokenizer))
    assert "asr export --lm" in caplog.text and str(bundle_dir) in caplog.text
    assert rec.calibration_for(DecodeOptions(lm_weight=0.5)) is None
    assert rec.calibration_for(DecodeOptions()) == calibration


# ---------------------------------------------------------------------------------------------
# The decode report


def test_decode_summary_reports_ece_as_reported_and_raw() -> None:
    utterances = [
        Utterance("a", "/a.flac", 1.0, "THE CAT SAT", "s"),
        Utterance("b", "/b.flac", 1.0, "A DOG", "s"),
        Utterance("c", "/c.flac", 1.0, "NOTHING HEARD", "s"),
    ]

    def words(*rows: tuple[str, float, float | None]) -> tuple[WordTiming, ...]:
        return tuple(WordTiming(w, 0.0, 0.1, c, r) for w, c, r in rows)

    transcripts = {
        "a": Transcript(
            "THE BAT SAT", (), 0.0, words(("THE", 0.9, 0.95), ("BAT", 0.2, 0.8), ("SAT", 0.9, 0.95))
        ),
        "b": Transcript("A DOG", (), 0.0, words(("A", 0.9, 0.99), ("DOG", 0.9, 0.9))),
        "c": Transcript("", (), 0.0),
    }
    scores = confidence_scores(utterances, transcripts)
    assert scores.right == [[True, False, True], [True, True]] and scores.words == 5
    rates, summary = score_decode(
        utterances,
        transcripts,
        DecodeOptions(),
        streaming=False,
        manifest=Path("m.jsonl"),
        seconds=1.0,
    )
    right = [True, False, True, True, True]
    reported = expected_calibration_error([0.9, 0.2, 0.9, 0.9, 0.9], right)
    raw = expected_calibration_error([0.95, 0.8, 0.95, 0.99, 0.9], right)
    assert summary["ece"] == round(reported, 4) and summary["raw_ece"] == round(raw, 4)
    assert summary["confidence_words"] == 5
    line = decode_line("test", rates, summary, 1.0, Path("out"))
    assert f"ECE {reported:.3f} (raw {raw:.3f})" in line
    # Without calibration the two are one; without words there is none.
    plain = {
        k: Transcript(
            t.text, (), 0.0, tuple(WordTiming(w.word, 0, 0, w.confidence) for w in t.words)
        )
        for k, t in transcripts.items()
    }
    _, summary = score_decode(
        utterances, plain, DecodeOptions(), streaming=False, manifest=Path("m"), seconds=1.0
    )
    assert summary["ece"] == summary["raw_ece"] == round(reported, 4)
    assert "(raw" not in decode_line("test", rates, summary, 1.0, Path("out"))
    empty = {k: Transcript(t.text, (), 0.0) for k, t in transcripts.items()}
    _, summary = score_decode(
        utterances, empty, DecodeOptions(), streaming=False, manifest=Path("m"), seconds=1.0
    )
    assert summary["ece"] is None and summary["raw_ece"] is None
    assert "ECE" not in decode_line("test", rates, summary, 1.0, Path("out"))
    assert rates == error_rates(
        [u.text for u in utterances], [t.text for t in transcripts.values()]
    )


def test_spread_takes_utterances_from_the_whole_manifest() -> None:
    utterances = [Utterance(str(i), "/x", 1.0, "A", str(i // 10)) for i in range(100)]
    chosen = spread(utterances, 10)
    assert [u.speaker for u in chosen] == [str(i) for i in range(10)]
    assert spread(utterances[:5], 10) == utterances[:5]


# ---------------------------------------------------------------------------------------------
# Fitted at export, applied to whole utterances and streams alike (the trained word model)


@pytest.fixture(scope="module")
def word_dev(word_corpus: WordCorpus, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_clips_manifest(word_corpus, tmp_path_factory.mktemp("dev"), 10, 11, "s", "dev")


def test_export_fits_calibration_on_dev_and_the_recognizer_applies_it(
    word_model: Bundle, word_corpus: WordCorpus, word_dev: Path, tmp_path: Path
) -> None:
    # An experiment directory holding the word model as its one checkpoint.
    exp = tmp_path / "exp"
    exp.mkdir()
    model = word_model.model
    assert isinstance(model, BiLSTMCTC)
    experiment = Experiment(
        model_type="ctc",
        model_config=model.config.to_dict(),
        train=TrainConfig(),
        train_manifest=str(word_dev),
        dev_manifest=str(word_dev),
    )
    state = {
        "model": model.state_dict(),
        "experiment": json.dumps(experiment.to_dict()),
        "step": 1,
        "epoch": 1,
        "history": "[]",
    }
    ckpt.save_atomic(state, ckpt.checkpoint_path(exp, 1))
    word_model.tokenizer.save(exp / "tokenizer.model")
    word_model.cmvn.save(exp / "cmvn.json")

    plain_dir = export_experiment(exp, tmp_path / "plain", calibrate=False)
    assert "calibration" not in json.loads((plain_dir / "config.json").read_text())
    bundle_dir = export_experiment(exp, tmp_path / "bundle", calibration_utterances=8)
    config = json.loads((bundle_dir / "config.json").read_text())
    report = config["results"]["calibration"]
    assert report["manifest"] == str(word_dev) and report["utterances"] == 8
    assert report["method"] == "beam" and report["words"] > 0
    assert report["ece_after"] < report["ece_before"]
    calibration = Calibration.from_bundle(config)
    assert calibration is not None

    # Whole utterances and a stream of the same audio give the same calibrated words.
    rec = Recognizer(load_bundle(bundle_dir))
    assert rec.calibration == calibration
    utt = word_corpus.utterance(random.Random(5))
    whole = rec.transcribe(utt.audio)
    session = StreamingSession(rec, interim_results=True)
    results = [
        r
        for at in range(0, utt.audio.numel(), 1600)
        for r in session.accept(utt.audio[at : at + 1600])
    ]
    results += session.finish()
    finals = [r.transcript for r in results if r.is_final]
    streamed = tuple(w for t in finals for w in t.words)
    assert whole.words and [w.word for w in streamed] == [w.word for w in whole.words]
    for words in (whole.words, *(t.words for t in finals)):  # a stream: per segment
        raw = [w.confidence if w.raw_confidence is None else w.raw_confidence for w in words]
        assert [w.confidence for w in words] == calibration.confidences(raw)
        assert all(w.raw_confidence is not None for w in words)
    assert all(not r.transcript.words for r in results if not r.is_final)  # partials: no words
    plain = Recognizer(load_bundle(plain_dir)).transcribe(utt.audio)
    assert [w.confidence for w in plain.words] == [w.raw_confidence for w in whole.words]
    assert "lm_calibration" not in config

    # With --lm: a second calibration, fitted on dev decoded with the LM, for fused decodes.
    texts = [json.loads(line)["text"] for line in word_dev.read_text().splitlines()]
    arpa = write_arpa(texts, tmp_path / "lm.arpa")
    with pytest.raises(ValueError, match="only used to calibrate"):
        export_experiment(exp, tmp_path / "nope", calibrate=False, lm=arpa)
    with pytest.raises(BundleError, match="no such language model"):
        export_experiment(exp, tmp_path / "nope", lm=tmp_path / "missing.arpa")
    assert not (tmp_path / "nope").exists()
    fused_dir = export_experiment(exp, tmp_path / "fused", calibration_utterances=8, lm=arpa)
    config = json.loads((fused_dir / "config.json").read_text())
    report = config["results"]["lm_calibration"]
    assert report["lm"] == str(arpa) and report["lm_weight"] == DEFAULT_LM_WEIGHT
    assert config["lm_calibration"]["lm_sha256"] == hashlib.sha256(arpa.read_bytes()).hexdigest()
    assert report["utterances"] == 8 and report["words"] > 0 and "ece_after" in report
    assert (
        config["calibration"] == json.loads((bundle_dir / "config.json").read_text())["calibration"]
    )
    fused_bundle = load_bundle(fused_dir)
    lm_calibration = fused_bundle.lm_calibration
    assert lm_calibration is not None
    fused = Recognizer(fused_bundle, lm=load_language_model(arpa, fused_bundle.tokenizer))
    assert fused.options.lm_weight == DEFAULT_LM_WEIGHT
    heard = fused.transcribe(utt.audio)
    raw = [w.raw_confidence for w in heard.words if w.raw_confidence is not None]
    assert raw and len(raw) == len(heard.words)
    assert [w.confidence for w in heard.words] == lm_calibration.confidences(raw)

    # The weight and bonus chosen at export travel with the bundle: fusing the same LM
    # without options of one's own decodes at them (as its calibration was fitted); another
    # LM, or options given, do not take them.
    tuned_dir = export_experiment(
        exp, tmp_path / "tuned", calibration_utterances=8, lm=arpa, lm_weight=0.8, length_bonus=2.0
    )
    tuned = load_bundle(tuned_dir)
    assert tuned.lm_fusion == {"lm_weight": 0.8, "length_bonus": 2.0}
    assert tuned.lm_calibration is not None  # the entry still reads as a calibration
    same = Recognizer(tuned, lm=load_language_model(arpa, tuned.tokenizer))
    assert (same.options.lm_weight, same.options.length_bonus) == (0.8, 2.0)
    other_arpa = write_arpa([*texts, "APPLE RIVER"], tmp_path / "other.arpa")
    other = Recognizer(tuned, lm=load_language_model(other_arpa, tuned.tokenizer))
    assert other.options.lm_weight == DEFAULT_LM_WEIGHT
    given = Recognizer(
        tuned, DecodeOptions(lm_weight=0.1), lm=load_language_model(arpa, tuned.tokenizer)
    )
    assert given.options.lm_weight == 0.1
    assert load_bundle(fused_dir).lm_fusion == {
        "lm_weight": DEFAULT_LM_WEIGHT,
        "length_bonus": fused.options.length_bonus,
    }
