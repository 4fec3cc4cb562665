"""LAS attention beam search throughput against beam size, batched over utterances against one
utterance at a time (the peer), on CPU, on the same encoder outputs.

    python bench/attention_decoding.py --model LAS_BUNDLE --manifest M.jsonl [--limit 40]

Defaults: the synthetic recipe's LAS bundle and held-out sentences. Decoding time only (the
listener runs once, before timing). Last line (machine-readable):
    attention beam<B> batched=<u>utt_per_s single=<v>utt_per_s batched_vs_single=<r>x
        joint_cost=<c>x    (all on one line)
(joint_cost: joint CTC/attention decoding time over plain attention beam search, batched).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from asr.bundle import load_bundle
from asr.data.dataset import SpeechDataset, collate
from asr.data.manifest import read_manifest
from asr.decoding.attention import attention_beam_search
from asr.decoding.options import DecodeOptions
from asr.models.las import LAS, EncoderOutput

REPO = Path(__file__).resolve().parents[1]


def encode(bundle_dir: Path, manifest: Path, limit: int) -> tuple[LAS, EncoderOutput]:
    bundle = load_bundle(bundle_dir)
    if not isinstance(bundle.model, LAS):
        raise SystemExit(f"{bundle_dir}: a LAS bundle is needed, not {bundle.model_type}")
    utterances = read_manifest(manifest)[:limit]
    data = SpeechDataset(utterances, bundle.tokenizer, bundle.feature_config)
    batch = collate([data[i] for i in range(len(data))])
    with torch.no_grad():
        return bundle.model, bundle.model.encode(batch.feats, batch.feat_lens)


def rate(model: LAS, enc: EncoderOutput, options: DecodeOptions, batch: int, joint: bool) -> float:
    """Utterances per second decoding `enc` in batches of `batch` utterances."""
    n = int(enc.lengths.shape[0])
    parts = [torch.arange(s, min(s + batch, n)) for s in range(0, n, batch)]
    start = time.perf_counter()
    for rows in parts:
        attention_beam_search(model, enc.select(rows), options, joint=joint)
    return n / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    synthetic = REPO / "exp/synthetic"
    parser.add_argument("--model", type=Path, default=synthetic / "exp/las/bundle")
    parser.add_argument(
        "--manifest", type=Path, default=synthetic / "data/manifests/heldout-sentences.jsonl"
    )
    parser.add_argument("--limit", type=int, default=40, help="utterances to decode")
    parser.add_argument("--beams", default="1,4,8")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, enc = encode(args.model, args.manifest, args.limit)
    n = int(enc.lengths.shape[0])
    print(f"{n} utterances, {int(enc.lengths.sum())} encoder frames, CPU, {args.threads} thread(s)")
    print("beam  batched utt/s  one-by-one utt/s  ratio  joint batched utt/s")
    last = ""
    for beam in [int(b) for b in args.beams.split(",")]:
        options = DecodeOptions(beam=beam)
        batched = rate(model, enc, options, n, joint=False)
        single = rate(model, enc, options, 1, joint=False)
        joint = rate(model, enc, options, n, joint=True) if enc.ctc_log_probs is not None else 0.0
        print(f"{beam:4d}  {batched:13.1f}  {single:16.1f}  {batched / single:5.2f}  {joint:19.1f}")
        last = (
            f"attention beam{beam} batched={batched:.1f}utt_per_s single={single:.1f}utt_per_s "
            f"batched_vs_single={batched / single:.2f}x "
            f"joint_cost={batched / joint if joint else float('nan'):.2f}x"
        )
    print(last)


if __name__ == "__main__":
    main()
