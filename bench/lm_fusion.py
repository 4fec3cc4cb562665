"""Language-model fusion in CTC beam search: WER and speed without an LM, with the LSTM LM,
and with a word 3-gram (ARPA), against flashlight-text's `ctc_decoder` (torchaudio) with the
same 3-gram through KenLM and a lexicon of the n-gram's words, on the same log-probs.

    python bench/lm_fusion.py --model CTC_BUNDLE --lm LM_BUNDLE --text TRAIN_TEXT \\
        --manifest M.jsonl [--limit 200] [--beam 10] [--lm-weight 0.3] [--ngram-weight 0.5]

The 3-gram is estimated from --text (asr.models.ngram.write_arpa; or pass --arpa). All
searches decode batches of 16 utterances at beam B with at most 16 tokens per frame, on CPU;
speed is utterances per second, the best of two runs after a warm-up. Last line (machine-readable):
    lm_fusion wer_no_lm=<a> wer_lstm=<b> wer_ngram=<c> speed_vs_no_lm=<r>x \\
        wer_lstm_int8=<b8> int8_speed_vs_no_lm=<r8>x ngram_speed_vs_no_lm=<r2>x \\
        wer_mix=<m> mix_speed_vs_no_lm=<r4>x \\
        flashlight_ngram_wer=<f> speed_vs_flashlight_ngram=<r3>x
(r: utterances/s with the LSTM LM over without; b8, r8: the same with the LM stepped on int8
weights, as `--quantize int8` runs it; m, r4: both LMs at once, each at half its weight,
as the recipes' LM mix; r3: ours with the 3-gram over flashlight's).
"""

from __future__ import annotations

import argparse
import math
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from ctc_decoders import log_probs_of, timed

from asr.bundle import load_lm_bundle
from asr.data.manifest import read_manifest
from asr.decoding.ctc import CTCPrefixBeamSearch
from asr.decoding.options import DecodeOptions
from asr.decoding.scorers import Fusion, LengthBonus, LSTMLMScorer, NGramScorer, Scorer
from asr.metrics import error_rates
from asr.models.ngram import NGramLM, write_arpa
from asr.tokenizer import Tokenizer
from asr.training.lm import read_sentences

BATCH = 16
TOKENS_PER_FRAME = 16

Decoder = Callable[[torch.Tensor, torch.Tensor], list[str]]


def ours(tokenizer: Tokenizer, beam: int, scorers: list[tuple[float, Scorer]]) -> Decoder:
    options = DecodeOptions(beam=beam, prune_top_k=TOKENS_PER_FRAME)
    search = CTCPrefixBeamSearch(options, Fusion(scorers))

    def decode(lp: torch.Tensor, lengths: torch.Tensor) -> list[str]:
        texts = []
        for start in range(0, lp.shape[0], BATCH):
            rows = slice(start, start + BATCH)
            width = int(lengths[rows].max())
            for hyps in search(lp[rows, :width], lengths[rows]):
                texts.append(tokenizer.decode(hyps[0].tokens) if hyps else "")
        return texts

    return decode


def flashlight(
    tokenizer: Tokenizer, beam: int, arpa: Path, words: list[str], weight: float, bonus: float
) -> Decoder:
    """flashlight's lexicon decoder with KenLM: words spelled in the model's units."""
    from torchaudio.models.decoder import ctc_decoder

    lexicon = Path(tempfile.mkdtemp()) / "lexicon.txt"
    pieces = tokenizer.pieces()
    lexicon.write_text(
        "".join(f"{w}\t{' '.join(pieces[i] for i in tokenizer.encode(w))}\n" for w in words)
    )
    decoder = ctc_decoder(
        lexicon=str(lexicon),
        tokens=pieces,
        lm=str(arpa),
        beam_size=beam,
        beam_size_token=TOKENS_PER_FRAME,
        lm_weight=weight,
        word_score=bonus,
        blank_token=pieces[tokenizer.blank_id],
        sil_token=pieces[tokenizer.unk_id],
        unk_word=NGramLM.UNK,
        log_add=True,
    )

    def decode(lp: torch.Tensor, lengths: torch.Tensor) -> list[str]:
        texts = []
        for start in range(0, lp.shape[0], BATCH):
            rows = slice(start, start + BATCH)
            for result in decoder(lp[rows].contiguous(), lengths[rows].int()):
                texts.append(" ".join(result[0].words) if result else "")
        return texts

    return decode


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", type=Path, required=True, help="BiLSTM-CTC bundle")
    p.add_argument("--lm", type=Path, required=True, help="LSTM LM bundle (same tokenizer)")
    p.add_argument("--text", type=Path, help="text to estimate the 3-gram from")
    p.add_argument("--arpa", type=Path, help="an ARPA file instead of --text")
    p.add_argument("--manifest", type=Path, required=True, help="test set (JSONL)")
    p.add_argument("--limit", type=int, default=200)
    p.add_argument("--beam", type=int, default=10)
    p.add_argument("--lm-weight", type=float, default=0.3)
    p.add_argument(
        "--lm-bonus", type=float, help="per unit, with the LSTM LM (default: weight x ln ppl)"
    )
    # Chosen on 80 dev-synth utterances with a BiLSTM-CTC of the synthetic recipe (WER 63.2 %
    # without LM): weight 0.3 / 0.6 / 1.0 with bonus 0 gave 46.3 / 55.3 / 75.0 %, with 1.0
    # 41.5 / 46.9 / 64.4 %, with 2.0 41.6 / 42.0 / 55.8 %.
    p.add_argument("--ngram-weight", type=float, default=0.3)
    p.add_argument("--length-bonus", type=float, default=1.0, help="per unit, with the 3-gram")
    p.add_argument("--word-score", type=float, default=1.0, help="flashlight's, per word")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    if (args.text is None) == (args.arpa is None):
        raise SystemExit("give --text (to estimate a 3-gram from) or --arpa")
    torch.set_num_threads(args.threads)
    lp, lengths, tokenizer, acoustic_s = log_probs_of(args.model, args.manifest, args.limit)
    refs = [u.text for u in read_manifest(args.manifest)[: args.limit]]
    arpa = args.arpa
    if arpa is None:
        arpa = write_arpa(read_sentences(args.text), Path(tempfile.mkdtemp()) / "3gram.arpa")
    ngram = NGramLM.load(arpa)
    ngram_scorer = NGramScorer(ngram, tokenizer)
    words = sorted(ngram_scorer.vocab)  # flashlight's lexicon: the words our scorer knows
    lm_bundle = load_lm_bundle(args.lm)
    lstm = lm_bundle.model
    # As the recipe's LM stage: a length bonus of weight x the LM's mean cost per unit on dev.
    ppl = lm_bundle.perplexity or 1.0
    lm_bonus = args.lm_bonus if args.lm_bonus is not None else args.lm_weight * math.log(ppl)
    vocab = tokenizer.vocab_size
    decoders = {
        "no_lm": ours(tokenizer, args.beam, []),
        "lstm": ours(
            tokenizer,
            args.beam,
            [(args.lm_weight, LSTMLMScorer(lstm)), (lm_bonus, LengthBonus(vocab))],
        ),
        # The same LM stepped with int8 weights (what `--quantize int8` runs).
        "lstm_int8": ours(
            tokenizer,
            args.beam,
            [(args.lm_weight, LSTMLMScorer(lstm.stepper("int8"))), (lm_bonus, LengthBonus(vocab))],
        ),
        "ngram": ours(
            tokenizer,
            args.beam,
            [
                (args.ngram_weight, ngram_scorer),
                (args.length_bonus, LengthBonus(vocab)),
            ],
        ),
        # Both LMs at once, as the recipes' METHOD+mix row: each at half its weight, with
        # half of each one's bonus (`asr lm mix`).
        "mix": ours(
            tokenizer,
            args.beam,
            [
                (args.lm_weight / 2, LSTMLMScorer(lstm)),
                (args.ngram_weight / 2, ngram_scorer),
                ((lm_bonus + args.length_bonus) / 2, LengthBonus(vocab)),
            ],
        ),
        "flashlight_ngram": flashlight(
            tokenizer, args.beam, arpa, words, args.ngram_weight, args.word_score
        ),
    }
    wer, speed = {}, {}
    print(f"{len(refs)} utterances of {args.manifest}, beam {args.beam}, {args.threads} thread(s)")
    for name, decode in decoders.items():
        hyps, speed[name] = timed(decode, lp, lengths)
        rates = error_rates(refs, hyps)
        wer[name] = rates.wer
        print(
            f"{name:>17}: WER {rates.wer:6.2f} %  CER {rates.cer:6.2f} %  {speed[name]:7.1f} utt/s"
        )

    # The whole decode: the acoustic model's forward pass (measured once, batches of 32)
    # plus the search; what a user of `asr decode` sees, beside the search alone.
    def whole(name: str) -> float:
        return 1.0 / (acoustic_s / len(refs) + 1.0 / speed[name])

    print(
        f"acoustic model {len(refs) / acoustic_s:.1f} utt/s; with it, the LSTM LM decode runs "
        f"at {whole('lstm') / whole('no_lm'):.2f}x and the 3-gram's at "
        f"{whole('ngram') / whole('no_lm'):.2f}x the speed without LM"
    )
    print(
        f"lm_fusion wer_no_lm={wer['no_lm']:.2f} wer_lstm={wer['lstm']:.2f} "
        f"wer_ngram={wer['ngram']:.2f} speed_vs_no_lm={speed['lstm'] / speed['no_lm']:.2f}x "
        f"wer_lstm_int8={wer['lstm_int8']:.2f} "
        f"int8_speed_vs_no_lm={speed['lstm_int8'] / speed['no_lm']:.2f}x "
        f"ngram_speed_vs_no_lm={speed['ngram'] / speed['no_lm']:.2f}x "
        f"wer_mix={wer['mix']:.2f} mix_speed_vs_no_lm={speed['mix'] / speed['no_lm']:.2f}x "
        f"flashlight_ngram_wer={wer['flashlight_ngram']:.2f} "
        f"speed_vs_flashlight_ngram={speed['ngram'] / speed['flashlight_ngram']:.2f}x"
    )


if __name__ == "__main__":
    main()
