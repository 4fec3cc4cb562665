"""CTC beam search throughput: our batched prefix beam search against torchaudio's
flashlight-text lexicon-free `ctc_decoder` (C++) and pyctcdecode (Python), on the same
log-probs of a trained model, on CPU, at beams 10 and 50, with agreement of best hypotheses.

    python bench/ctc_decoders.py --model BUNDLE --manifest M.jsonl [--limit 300] [--threads 1]

Defaults: the synthetic recipe's BiLSTM-CTC bundle and held-out sentences. Every decoder gets
the same settings: no LM, beam B, at most 16 tokens per frame. Last line (machine-readable):
    ctc_beam10 vs_flashlight=<r1>x vs_pyctcdecode=<r2>x agree=<p>% ours_more_probable=<a>/<n>
(r: our utterances/s over the peer's; agree: utterances whose best hypothesis equals
flashlight's; of the n that differ, a where ours has the higher CTC probability, since
flashlight ranks a prefix's blank and non-blank endings apart instead of summing them).
"""

from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from asr.bundle import load_bundle
from asr.data.dataset import SpeechDataset, collate
from asr.data.manifest import read_manifest
from asr.decoding.ctc import CTCPrefixBeamSearch
from asr.decoding.options import DecodeOptions
from asr.models.bilstm_ctc import BiLSTMCTC
from asr.models.ctc import ctc_loss
from asr.tokenizer import Tokenizer

REPO = Path(__file__).resolve().parents[1]
TOKENS_PER_FRAME = 16

# Best hypothesis per utterance: token ids (ours, flashlight) or text (pyctcdecode).
Decoder = Callable[[torch.Tensor, torch.Tensor], list[Any]]


def log_probs_of(
    bundle_dir: Path, manifest: Path, limit: int
) -> tuple[torch.Tensor, torch.Tensor, Tokenizer, float]:
    """CTC log-probs (N, T', V) and lengths (N,) of the first `limit` utterances, and the
    seconds the acoustic model took over them (features excluded)."""
    bundle = load_bundle(bundle_dir)
    if not isinstance(bundle.model, BiLSTMCTC):
        raise SystemExit(f"{bundle_dir}: a BiLSTM-CTC bundle is needed, not {bundle.model_type}")
    utterances = read_manifest(manifest)[:limit]
    data = SpeechDataset(utterances, bundle.tokenizer, bundle.feature_config)
    outputs: list[torch.Tensor] = []
    seconds = 0.0
    with torch.no_grad():
        for start in range(0, len(data), 32):
            batch = collate([data[i] for i in range(start, min(start + 32, len(data)))])
            begin = time.perf_counter()
            lp, lens = bundle.model.log_probs(batch.feats, batch.feat_lens)
            seconds += time.perf_counter() - begin
            outputs += [lp[i, : int(n)] for i, n in enumerate(lens)]
    lengths = torch.tensor([o.shape[0] for o in outputs])
    padded = torch.nn.utils.rnn.pad_sequence(outputs, batch_first=True)
    return padded.contiguous(), lengths, bundle.tokenizer, seconds


def ours(tokenizer: Tokenizer, beam: int, batch: int) -> Decoder:
    search = CTCPrefixBeamSearch(DecodeOptions(beam=beam, prune_top_k=TOKENS_PER_FRAME))

    def decode(lp: torch.Tensor, lengths: torch.Tensor) -> list[list[int]]:
        best: list[list[int]] = []
        for start in range(0, lp.shape[0], batch):
            part = slice(start, start + batch)
            width = int(lengths[part].max())
            best += [list(h[0].tokens) for h in search(lp[part, :width], lengths[part])]
        return best

    return decode


def flashlight(tokenizer: Tokenizer, beam: int) -> Decoder:
    from torchaudio.models.decoder import ctc_decoder

    pieces = tokenizer.pieces()
    # Lexicon-free decoding needs a silence token; <unk> is one the model never has to emit.
    decoder = ctc_decoder(
        lexicon=None,
        tokens=pieces,
        beam_size=beam,
        beam_size_token=TOKENS_PER_FRAME,
        blank_token=pieces[tokenizer.blank_id],
        sil_token=pieces[tokenizer.unk_id],
        log_add=True,  # sum over merged paths, as prefix beam search does
    )

    def decode(lp: torch.Tensor, lengths: torch.Tensor) -> list[list[int]]:
        return [_strip(r[0].tokens.tolist(), tokenizer) for r in decoder(lp, lengths.int())]

    return decode


def _strip(ids: Sequence[int], tokenizer: Tokenizer) -> list[int]:
    """flashlight brackets lexicon-free output with the silence token: drop it."""
    return [i for i in ids if i != tokenizer.unk_id]


def pyctcdecode(tokenizer: Tokenizer, beam: int) -> Decoder:
    logging.getLogger("pyctcdecode").setLevel(logging.ERROR)  # "no kenlm" notices
    from pyctcdecode import build_ctcdecoder

    labels = tokenizer.pieces()
    labels[tokenizer.blank_id] = ""  # how pyctcdecode spells blank
    labels[tokenizer.unk_id] = "\u2581\u2047"
    labels[tokenizer.sos_id] = "\u2581<sos/eos>"
    decoder = build_ctcdecoder(labels)

    def decode(lp: torch.Tensor, lengths: torch.Tensor) -> list[str]:
        arrays = [lp[i, : int(n)].numpy() for i, n in enumerate(lengths)]
        return [" ".join(decoder.decode(a, beam_width=beam).split()) for a in arrays]

    return decode


def timed(decode: Decoder, lp: torch.Tensor, lengths: torch.Tensor) -> tuple[list[Any], float]:
    """Best hypotheses and utterances per second (best of two runs after a warm-up)."""
    decode(lp[:8], lengths[:8])
    best, out = float("inf"), []
    for _ in range(2):
        start = time.perf_counter()
        out = decode(lp, lengths)
        best = min(best, time.perf_counter() - start)
    return out, lp.shape[0] / best


def ctc_log_likelihood(lp: torch.Tensor, length: int, tokens: list[int]) -> float:
    """log P(tokens | x) summed over all CTC alignments: the quantity both searches approximate."""
    if not tokens:
        return float(lp[:length, 0].sum())
    return -float(
        ctc_loss(
            lp[None, :length],
            torch.tensor([length]),
            torch.tensor([tokens]),
            torch.tensor([len(tokens)]),
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    synthetic = REPO / "exp/synthetic"
    parser.add_argument("--model", type=Path, default=synthetic / "exp/ctc/bundle")
    parser.add_argument(
        "--manifest", type=Path, default=synthetic / "data/manifests/heldout-sentences.jsonl"
    )
    parser.add_argument("--limit", type=int, default=300, help="utterances to decode")
    parser.add_argument("--beams", default="10,50")
    parser.add_argument("--batch", type=int, default=256, help="our batch size (utterances)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (ours)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    lp, lengths, tokenizer, _ = log_probs_of(args.model, args.manifest, args.limit)
    frames = int(lengths.sum())
    print(f"{lp.shape[0]} utterances, {frames} frames, vocabulary {lp.shape[2]}, CPU")
    summary = ""
    for beam in [int(b) for b in args.beams.split(",")]:
        our_best, our_rate = timed(ours(tokenizer, beam, args.batch), lp, lengths)
        fl_best, fl_rate = timed(flashlight(tokenizer, beam), lp, lengths)
        py_texts, py_rate = timed(pyctcdecode(tokenizer, beam), lp, lengths)
        differ = [i for i, (a, b) in enumerate(zip(our_best, fl_best, strict=True)) if a != b]
        # Where the two disagree, which found the labelling the model finds more probable?
        # The gap tells near-ties (which any two searches may split) from search errors.
        gaps = [
            ctc_log_likelihood(lp[i], int(lengths[i]), our_best[i])
            - ctc_log_likelihood(lp[i], int(lengths[i]), fl_best[i])
            for i in differ
        ]
        ours_better = sum(g >= 0 for g in gaps)
        median_gap = float(torch.tensor(gaps).abs().median()) if gaps else 0.0
        agree_fl = 100.0 * (len(lp) - len(differ)) / len(lp)
        our_texts = [tokenizer.decode(t) for t in our_best]
        # pyctcdecode renders subwords to words itself: compare without spaces.
        agree_py = (
            100.0
            * sum(
                a.replace(" ", "") == b.replace(" ", "")
                for a, b in zip(our_texts, py_texts, strict=True)
            )
            / len(lp)
        )
        print(
            f"beam {beam}: ours {our_rate:.1f} utt/s, flashlight {fl_rate:.1f} utt/s, "
            f"pyctcdecode {py_rate:.1f} utt/s; same best hypothesis as flashlight "
            f"{agree_fl:.1f} % (of the {len(differ)} others, ours is at least as probable "
            f"under the model in {ours_better}; median gap {median_gap:.3f} nats), "
            f"same text as pyctcdecode {agree_py:.1f} %"
        )
        line = (
            f"ctc_beam{beam} vs_flashlight={our_rate / fl_rate:.2f}x "
            f"vs_pyctcdecode={our_rate / py_rate:.2f}x agree={agree_fl:.1f}% "
            f"ours_more_probable={ours_better}/{len(differ)}"
        )
        print(line)
        if beam == 10:
            summary = line
    if summary:
        print(summary)


if __name__ == "__main__":
    main()
