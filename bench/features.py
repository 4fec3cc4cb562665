"""Feature extraction speed: our log-mel (torchaudio MelSpectrogram, snip-edges framing) against
torchaudio's Kaldi-compatible `fbank`, on the same audio in the same run, one thread each.

    python bench/features.py [--seconds 60] [--repeats 5]

Audio: the real LibriSpeech clips in ../shared when present, else a synthetic chirp-plus-noise.
Last line (machine-readable):
    features kaldi_fbank=<x>x_realtime melspectrogram=<y>x_realtime
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torchaudio.compliance.kaldi as kaldi

from asr.audio import SAMPLE_RATE, load_audio
from asr.features import FeatureConfig, log_mel

REAL = Path(__file__).resolve().parents[2] / "shared/data/librispeech-real/LibriSpeech"


def _clips(seconds: float) -> list[torch.Tensor]:
    """Utterance-sized clips totalling about `seconds` of audio."""
    sources = [load_audio(p) for p in sorted(REAL.rglob("*.flac"))] if REAL.is_dir() else []
    if not sources:
        gen = torch.Generator().manual_seed(0)
        t = torch.arange(12 * SAMPLE_RATE) / SAMPLE_RATE
        chirp = 0.3 * torch.sin(2 * torch.pi * (200 + 300 * t) * t)
        sources = [chirp + 0.01 * torch.randn(t.shape, generator=gen)]
    clips: list[torch.Tensor] = []
    total = 0.0
    while total < seconds:
        clip = sources[len(clips) % len(sources)]
        clips.append(clip)
        total += clip.numel() / SAMPLE_RATE
    return clips


def _realtime(
    fn: Callable[[torch.Tensor], torch.Tensor], clips: list[torch.Tensor], repeats: int
) -> float:
    audio_seconds = sum(c.numel() for c in clips) / SAMPLE_RATE
    for clip in clips[:2]:
        fn(clip)  # warm-up: window and filterbank caches
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for clip in clips:
            fn(clip)
        best = min(best, time.perf_counter() - start)
    return audio_seconds / best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--seconds", type=float, default=60.0, help="audio per repeat")
    parser.add_argument("--repeats", type=int, default=5, help="best of this many")
    args = parser.parse_args()
    torch.set_num_threads(1)  # per-utterance extraction runs in single-threaded loader workers
    config = FeatureConfig()
    clips = _clips(args.seconds)

    def ours(wave: torch.Tensor) -> torch.Tensor:
        return log_mel(wave, config)

    def fbank(wave: torch.Tensor) -> torch.Tensor:
        return kaldi.fbank(wave[None] * 32768, num_mel_bins=config.num_mel_bins, dither=0.0)

    mel = _realtime(ours, clips, args.repeats)
    kal = _realtime(fbank, clips, args.repeats)
    audio = sum(c.numel() for c in clips) / SAMPLE_RATE
    print(f"audio: {len(clips)} clips, {audio:.0f} s per repeat, best of {args.repeats}, 1 thread")
    print(f"melspectrogram (ours): {mel:8.0f} x real time")
    print(f"kaldi fbank (peer):    {kal:8.0f} x real time")
    print(f"ratio ours/peer: {mel / kal:.2f}x")
    print(f"features kaldi_fbank={kal:.0f}x_realtime melspectrogram={mel:.0f}x_realtime")


if __name__ == "__main__":
    main()
