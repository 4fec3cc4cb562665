"""How long a good Recognize call waits behind an expensive one, on the server's engine.

    python bench/server_fairness.py [--model exp/demo/bundle] [--audio CLIP.flac]
        [--long-seconds 600] [--beam 64] [--slice-ms 20] [--repeats 3]

In process (no gRPC): the engine the server runs, the bundle's Recognizer. The good call is
the clip (default: a LibriSpeech test-clean utterance from ../shared) with the bundle's
options; the expensive one is the clip tiled to --long-seconds, decoded with --beam and no
pruning (the worst the request limits allow). Measured, median of --repeats:
  alone: the good call's latency on an idle engine;
  behind: its latency when sent once the expensive call's decode is under way, with the
    engine slicing (--slice-ms) and with slicing off (one call holds the model to its end,
    as before slicing);
and the expensive call's own latency. Last line (machine-readable): JSON of the figures and
the ratios behind/alone.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from dataclasses import replace
from pathlib import Path

import torch

from asr import load_model
from asr.audio import load_audio
from asr.decoding.options import DecodeOptions
from asr.recognizer import Recognizer
from server.engine import Worker

CLIP = Path(__file__).resolve().parents[2] / (
    "shared/data/librispeech-real/LibriSpeech/test-clean/1089/134686/1089-134686-0000.flac"
)


async def latency(
    engine: Worker, recognizer: Recognizer, audio: torch.Tensor, options: DecodeOptions
) -> float:
    start = time.perf_counter()
    await engine.recognize(recognizer, audio, options)
    return time.perf_counter() - start


async def alone(
    recognizer: Recognizer, audio: torch.Tensor, options: DecodeOptions, repeats: int
) -> float:
    """Median latency of a call on an idle engine (after one warm-up call)."""
    engine = Worker(torch_threads=1, max_batch=16, max_wait_ms=10.0)
    engine.start()
    try:
        await latency(engine, recognizer, audio, options)
        return statistics.median(
            [await latency(engine, recognizer, audio, options) for _ in range(repeats)]
        )
    finally:
        await engine.stop()


async def measure(
    recognizer: Recognizer,
    good: torch.Tensor,
    long: torch.Tensor,
    expensive: DecodeOptions,
    slice_ms: float,
    head_start: float,
) -> tuple[float, float]:
    """(the good call's latency sent behind the expensive one, the expensive one's)."""
    engine = Worker(torch_threads=1, max_batch=16, max_wait_ms=10.0, slice_ms=slice_ms)
    engine.start()
    try:
        start = time.perf_counter()
        slow = asyncio.ensure_future(engine.recognize(recognizer, long, expensive))
        await asyncio.sleep(head_start)  # into its search, past the forward pass
        behind = await latency(engine, recognizer, good, recognizer.options)
        await slow
        return behind, time.perf_counter() - start
    finally:
        await engine.stop()


async def main(args: argparse.Namespace) -> dict[str, float]:
    torch.set_num_threads(1)
    recognizer = load_model(args.model)
    good = load_audio(args.audio)
    long = good.repeat(int(args.long_seconds * 16_000 / good.numel()) + 1)[
        : int(args.long_seconds * 16_000)
    ]
    expensive = replace(
        recognizer.options,
        method="beam",
        beam=args.beam,
        prune_top_k=None,
        prune_threshold=None,
        blank_skip=None,
    )
    good_alone = await alone(recognizer, good, recognizer.options, 5)
    expensive_alone = await alone(recognizer, long, expensive, 1)
    out = {"alone_s": good_alone, "expensive_alone_s": expensive_alone}
    for name, ms in (("sliced", args.slice_ms), ("unsliced", 1e9)):
        pairs = [
            await measure(recognizer, good, long, expensive, ms, 0.25 * expensive_alone)
            for _ in range(args.repeats)
        ]
        behind = statistics.median(b for b, _ in pairs)
        out[f"behind_{name}_s"] = behind
        out[f"expensive_{name}_s"] = statistics.median(e for _, e in pairs)
        out[f"ratio_{name}"] = behind / good_alone
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="exp/demo/bundle")
    parser.add_argument("--audio", default=str(CLIP))
    parser.add_argument("--long-seconds", type=float, default=600.0)
    parser.add_argument("--beam", type=int, default=64)
    parser.add_argument("--slice-ms", type=float, default=20.0)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    figures = asyncio.run(main(args))
    for name, value in figures.items():
        print(f"{name:>22}: {value:8.3f}")
    print(json.dumps({k: round(v, 4) for k, v in figures.items()}))
