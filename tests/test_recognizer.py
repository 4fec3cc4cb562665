"""The Recognizer and `asr decode`: every method of both model types, two-pass rescoring across
bundles, the files `asr decode` writes, and clear errors for options that cannot work."""

from __future__ import annotations

import json
import random
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from asr.bundle import Bundle, BundleError, load_bundle
from asr.cli import main
from asr.decoding.attention import attention_scores
from asr.decoding.options import DecodeOptions
from asr.models.las import LAS
from asr.recognizer import METHODS, Recognizer
from asr.tokenizer import Tokenizer
from tests.word_corpus import WordCorpus, save_bundle, untrained_las, write_clips_manifest


@pytest.fixture(scope="module")
def ctc_dir(word_model: Bundle, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_bundle(word_model, tmp_path_factory.mktemp("ctc") / "bundle")


@pytest.fixture(scope="module")
def las_dir(word_model: Bundle, tmp_path_factory: pytest.TempPathFactory) -> Path:
    bundle = untrained_las(word_model, word_model.tokenizer)
    return save_bundle(bundle, tmp_path_factory.mktemp("las") / "bundle")


@pytest.fixture(scope="module")
def manifest(word_corpus: WordCorpus, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("audio")
    return write_clips_manifest(word_corpus, root, 12, 7, "s1", "test")


def test_decode_writes_hypotheses_report_and_scores(
    ctc_dir: Path, manifest: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    results = tmp_path / "results.json"
    for method in ("greedy", "beam"):
        out = tmp_path / method
        argv = ["decode", "--model", str(ctc_dir), "--manifest", str(manifest), "--out", str(out)]
        assert main([*argv, "--method", method, "--results", str(results)]) == 0
        line = capsys.readouterr().out
        assert line.startswith(f"test: {method} WER ") and "RTF" in line
        wer = json.loads((out / "wer.json").read_text())
        assert wer["method"] == method and wer["utterances"] == 12
        assert wer["wer"] <= 10.0  # the word model knows these words
        assert {"substitutions", "deletions", "insertions", "cer", "rtf"} <= set(wer)
        rows = [json.loads(line) for line in (out / "hyps.jsonl").read_text().splitlines()]
        assert len(rows) == 12 and all(r["words"] for r in rows if r["text"])
        starts = [w["start"] for w in rows[0]["words"]]
        assert starts == sorted(starts)
        assert (out / "errors.txt").read_text().startswith("WER ")
        assert len((out / "hyps.tsv").read_text().splitlines()) == 13
    merged = json.loads(results.read_text())
    assert set(merged["methods"]) == {"greedy", "beam"}
    assert merged["tests"]["test"]["method"] == "greedy"  # the table's greedy column
    assert merged["model"] == "ctc" and merged["preset"] == "test"
    assert main(["results", str(results)]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0] == "| model | method | test |"
    assert table[2].startswith("| ctc test | greedy | ")
    assert table[3].startswith("| ctc test | beam | ")


def test_streaming_decode_reports_the_streaming_gap(
    ctc_dir: Path, manifest: Path, tmp_path: Path
) -> None:
    argv = ["decode", "--model", str(ctc_dir), "--manifest", str(manifest)]
    results = tmp_path / "results.json"
    for extra in ([], ["--streaming"]):
        assert (
            main(
                [*argv, "--out", str(tmp_path / str(len(extra))), "--results", str(results), *extra]
            )
            == 0
        )
    merged = json.loads(results.read_text())["methods"]
    whole, streamed = merged["beam"]["test"], merged["streaming-beam"]["test"]
    # The latency-controlled model decodes the same audio alike whole or in chunks; endpoints
    # cut only at long pauses, so the word model's streamed transcripts hardly differ.
    assert streamed["wer"] <= whole["wer"] + 2.0
    rows = [json.loads(x) for x in (tmp_path / "1" / "hyps.jsonl").read_text().splitlines()]
    assert len(rows) == 12 and all(r["words"] and len(r["nbest"]) == 1 for r in rows if r["text"])


def test_two_pass_rescoring_across_bundles(
    ctc_dir: Path, las_dir: Path, manifest: Path, tmp_path: Path
) -> None:
    argv = ["decode", "--model", str(ctc_dir), "--manifest", str(manifest)]
    out = tmp_path / "rescore"
    args = [*argv, "--out", str(out), "--method", "rescore", "--rescore-model", str(las_dir)]
    assert main(args) == 0
    wer = json.loads((out / "wer.json").read_text())
    assert wer["method"] == "rescore" and wer["rescore_model"] == str(las_dir)
    # The LAS's internal LM subtracted: filed apart from the plain decode.
    out = tmp_path / "joint-ilm"
    args = [*argv, "--out", str(out), "--method", "joint", "--rescore-model", str(las_dir)]
    assert main([*args, "--ilm-weight", "0.2"]) == 0
    wer = json.loads((out / "wer.json").read_text())
    assert wer["method"] == "joint-ilm" and wer["options"]["ilm_weight"] == 0.2


def _batch(
    rec: Recognizer, word_corpus: WordCorpus, seed: int, n: int = 4
) -> tuple[torch.Tensor, torch.Tensor]:
    rng = random.Random(seed)
    feats = [rec.features(word_corpus.utterance(rng).audio) for _ in range(n)]
    lengths = torch.tensor([f.shape[0] for f in feats])
    return torch.nn.utils.rnn.pad_sequence(feats, batch_first=True), lengths


def test_rescoring_ranks_each_utterances_nbest_by_the_weighted_scores(
    word_corpus: WordCorpus, ctc_dir: Path, las_dir: Path
) -> None:
    ctc, las = load_bundle(ctc_dir), load_bundle(las_dir)
    assert isinstance(las.model, LAS)
    first = Recognizer(ctc, DecodeOptions(method="beam", beam=4, nbest=4))
    padded, lengths = _batch(first, word_corpus, 13)
    nbest = first.decode(padded, lengths)
    # Recompute the second pass by hand: the LAS's log P(y + eos | x) of every alternative of
    # every utterance, mixed with its CTC score; a mix-up of rows would rank another
    # utterance's alternatives.
    with torch.no_grad():
        enc = las.model.encode(padded, lengths)
        for weight in (0.0, 0.3, 1.0):
            rescored = Recognizer(
                ctc, DecodeOptions(method="rescore", beam=4, nbest=4, ctc_weight=weight), las
            ).decode(padded, lengths)
            for b, (t, r) in enumerate(zip(nbest, rescored, strict=True)):
                rows = torch.full((len(t.nbest),), b)
                att = attention_scores(las.model, enc, rows, [a.tokens for a in t.nbest])
                mixed = sorted(
                    ((1 - weight) * float(s) + weight * a.score, a.tokens)
                    for a, s in zip(t.nbest, att, strict=True)
                )[::-1]
                assert [a.tokens for a in r.nbest] == [tokens for _, tokens in mixed]
                assert [a.score for a in r.nbest] == pytest.approx([m for m, _ in mixed])
            if weight == 1.0:  # the CTC scores alone: the first pass's order
                assert [r.text for r in rescored] == [t.text for t in nbest]


def test_joint_decoding_across_bundles_scores_with_the_ctc_models_posteriors(
    word_model: Bundle, word_corpus: WordCorpus, ctc_dir: Path, las_dir: Path
) -> None:
    ctc, las = load_bundle(ctc_dir), load_bundle(las_dir)
    assert Recognizer(ctc, rescorer=las).options.method == "joint"  # given the LAS, use both
    # CTC weight 1 with every token a candidate: the (untrained) attention decoder only
    # proposes, the word model's CTC posteriors rank, so the search finds the CTC model's own
    # best transcript. Any mix-up of the two models' frames or lengths would lose it.
    vocab = word_model.tokenizer.vocab_size
    options = DecodeOptions(
        method="joint", ctc_weight=1.0, joint_candidates=vocab, length_penalty=0.0, beam=4
    )
    joint = Recognizer(ctc, options, rescorer=las)
    beam = Recognizer(ctc, DecodeOptions(method="beam"))
    padded, lengths = _batch(joint, word_corpus, 11)
    ours = joint.decode(padded, lengths)
    assert [t.text for t in ours] == [t.text for t in beam.decode(padded, lengths)]
    assert all(t.words and t.text for t in ours)  # word timings from the CTC model's alignment
    # CTC weight 0: the attention decoder alone, as the LAS bundle's own beam search.
    alone = Recognizer(ctc, replace(options, ctc_weight=0.0), rescorer=las).decode(padded, lengths)
    las_beam = Recognizer(las, DecodeOptions(method="beam", beam=4, length_penalty=0.0))
    assert [t.tokens for t in alone] == [t.tokens for t in las_beam.decode(padded, lengths)]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--method", "nope"], "choose one of greedy, beam, rescore, joint"),
        (["--method", "rescore"], "needs a LAS bundle"),
        (["--method", "joint"], "needs a LAS bundle"),
        (["--set", "bogus=1"], "unknown decoding option(s) bogus"),
        (["--beam", "0"], "invalid DecodeOptions: beam must be >= 1, got 0"),
        (["--ilm-weight", "0.3"], "method 'beam' of this CTC model searches without one"),
        (["--ilm-weight", "-1"], "ilm_weight must be in [0, 10]"),
    ],
)
def test_decode_rejects_options_that_cannot_work(
    ctc_dir: Path,
    manifest: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    extra: list[str],
    message: str,
) -> None:
    argv = ["decode", "--model", str(ctc_dir), "--manifest", str(manifest), "--out", str(tmp_path)]
    assert main([*argv, *extra]) == 2
    assert message in capsys.readouterr().err


def test_rescorer_must_share_the_tokenizer(word_model: Bundle, ctc_dir: Path) -> None:
    other = Tokenizer.train(["SOMETHING ELSE ENTIRELY", "QUITE DIFFERENT"], "char", 64)
    las_bundle = untrained_las(word_model, other)
    with pytest.raises(BundleError, match="tokenizer differs"):
        Recognizer(load_bundle(ctc_dir), DecodeOptions(method="rescore"), rescorer=las_bundle)
    with pytest.raises(BundleError, match="must be LAS"):
        Recognizer(load_bundle(ctc_dir), rescorer=load_bundle(ctc_dir))


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_las_method_returns_typed_transcripts(
    word_model: Bundle, word_corpus: WordCorpus, method: str
) -> None:
    bundle = untrained_las(word_model, word_model.tokenizer)
    rec = Recognizer(bundle, DecodeOptions(method=method, beam=3, nbest=2, max_len_ratio=0.5))
    rng = random.Random(3)
    feats = [rec.features(word_corpus.utterance(rng).audio) for _ in range(2)]
    lengths = torch.tensor([f.shape[0] for f in feats])
    transcripts = rec.decode(torch.nn.utils.rnn.pad_sequence(feats, batch_first=True), lengths)
    assert len(transcripts) == 2
    for t in transcripts:
        assert 1 <= len(t.nbest) <= 2 and t.nbest[0].tokens == t.tokens
        assert t.text == word_model.tokenizer.decode(t.tokens)
        json.dumps(t.to_dict())  # serialisable as is


def test_ctc_transcripts_carry_nbest_and_confidence(
    word_model: Bundle, word_corpus: WordCorpus
) -> None:
    rec = Recognizer(word_model, DecodeOptions(method="beam", nbest=3))
    utt = word_corpus.utterance(random.Random(5))
    feats = rec.features(utt.audio)
    [t] = rec.decode(feats[None], torch.tensor([feats.shape[0]]))
    assert t.text == utt.text
    assert len(t.nbest) == 3 and [a.score for a in t.nbest] == sorted(
        [a.score for a in t.nbest], reverse=True
    )
    assert 0.5 < t.confidence <= 1.0
    greedy = rec.decode(feats[None], torch.tensor([feats.shape[0]]), DecodeOptions(method="greedy"))
    assert greedy[0].text == utt.text and len(greedy[0].nbest) == 1


def test_bundles_decode_with_their_best_method_by_default(ctc_dir: Path, las_dir: Path) -> None:
    assert Recognizer(load_bundle(ctc_dir)).options.method == "beam"
    assert Recognizer(load_bundle(las_dir)).options.method == "joint"  # it has a CTC head


def test_methods_follow_what_the_models_offer(
    word_model: Bundle, ctc_dir: Path, las_dir: Path
) -> None:
    ctc, las = load_bundle(ctc_dir), load_bundle(las_dir)
    assert Recognizer(ctc).methods == ("greedy", "beam")
    assert Recognizer(ctc, rescorer=las).methods == ("greedy", "beam", "rescore", "joint")
    assert Recognizer(las).methods == ("greedy", "beam", "rescore", "joint")
    headless = untrained_las(word_model, word_model.tokenizer, ctc_weight=0.0)
    assert Recognizer(headless).methods == ("greedy", "beam")
    assert Recognizer(headless).options.method == "beam"
    for method in ("joint", "rescore"):
        with pytest.raises(ValueError, match="needs CTC posteriors"):
            Recognizer(headless, DecodeOptions(method=method))
        with pytest.raises(ValueError, match="needs an attention decoder"):
            Recognizer(ctc, DecodeOptions(method=method))
