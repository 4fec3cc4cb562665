"""Acoustic features: log-mel filterbanks (optionally cepstrally smoothed), global CMVN,
SpecAugment, speed perturbation.

Framing follows Kaldi's `snip_edges` convention: frame t covers samples [t * hop, t * hop + win).
No padding at either edge means a frame depends only on its own samples, so features computed
chunk by chunk from a stream equal the features of the whole signal (`StreamingFeatures`), which
is what lets the streaming server and offline decoding agree.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property, lru_cache
from pathlib import Path

import torch
import torchaudio.functional as AF
import torchaudio.transforms as AT
from torch.nn.utils.rnn import pad_sequence

from asr.audio import SAMPLE_RATE, resample
from asr.config import Config

SPEED_FACTORS = (0.9, 1.0, 1.1)  # Ko et al. 2015: the standard 3-way speed perturbation


@dataclass(frozen=True)
class FeatureConfig(Config):
    """Log-mel filterbank settings. Stored in every bundle so inference matches training."""

    num_mel_bins: int = 80
    window_ms: float = 25.0
    hop_ms: float = 10.0
    f_min: float = 20.0
    f_max: float = 7600.0  # just under Nyquist: the top band of resampled audio is often empty
    dither: float = 1.0 / 32768  # one 16-bit quantisation step; applied in training only
    log_floor: float = 1e-10  # keeps log() finite on digital silence
    # Keep only the first this many cepstral coefficients (the DCT of each log-mel frame) and
    # transform back to log-mel bins: the spectral envelope (formants, tilt) without the
    # harmonics of the voice's pitch and the fine structure that each synthesizer's (or
    # speaker's) excitation leaves, as MFCCs do (13-20 of them in most recognizers). The
    # output keeps num_mel_bins bins, so SpecAugment and VTLP work on it unchanged. None: off.
    cepstra: int | None = None

    @property
    def win_length(self) -> int:
        return round(SAMPLE_RATE * self.window_ms / 1000)

    @property
    def hop_length(self) -> int:
        return round(SAMPLE_RATE * self.hop_ms / 1000)

    def num_frames(self, num_samples: int) -> int:
        """Frames produced for `num_samples` samples (0 when shorter than one window)."""
        if num_samples < self.win_length:
            return 0
        return 1 + (num_samples - self.win_length) // self.hop_length

    def validate(self) -> None:
        self.check(
            {
                "num_mel_bins": (self.num_mel_bins >= 1, ">= 1"),
                "window_ms": (self.window_ms > 0, "> 0"),
                "hop_ms": (0 < self.hop_ms <= self.window_ms, "in (0, window_ms]"),
                "f_max": (
                    0 <= self.f_min < self.f_max <= SAMPLE_RATE / 2,
                    f"above f_min and at most {SAMPLE_RATE // 2} Hz",
                ),
                "dither": (self.dither >= 0, ">= 0"),
                "log_floor": (self.log_floor > 0, "> 0"),
                "cepstra": (
                    self.cepstra is None or 1 <= self.cepstra <= self.num_mel_bins,
                    "None or in [1, num_mel_bins]",
                ),
            }
        )


@lru_cache(maxsize=8)
def _mel_transform(config: FeatureConfig) -> AT.MelSpectrogram:
    return AT.MelSpectrogram(
        sample_rate=SAMPLE_RATE,
        n_fft=config.win_length,
        win_length=config.win_length,
        hop_length=config.hop_length,
        f_min=config.f_min,
        f_max=config.f_max,
        n_mels=config.num_mel_bins,
        center=False,  # snip_edges framing: see the module docstring
        power=2.0,
        norm="slaney",
        mel_scale="slaney",
    )


@lru_cache(maxsize=8)
def _smoothing(config: FeatureConfig) -> torch.Tensor:
    """(F, F) projection of log-mel frames onto their first `cepstra` orthonormal DCT-II
    coefficients and back (symmetric: frames @ it smooths them)."""
    assert config.cepstra is not None
    dct = AF.create_dct(config.cepstra, config.num_mel_bins, norm="ortho")  # (F, C)
    return dct @ dct.T


def mel_centres(config: FeatureConfig) -> torch.Tensor:
    """(F,) centre frequency in Hz of each mel filter `log_mel` uses (its filterbank's
    weighted mean frequency)."""
    fbank = _mel_transform(config).mel_scale.fb  # (n_freqs, F)
    freqs = torch.linspace(0, SAMPLE_RATE / 2, fbank.shape[0])
    return (fbank * freqs[:, None]).sum(0) / fbank.sum(0).clamp(min=1e-10)


def log_mel(
    wave: torch.Tensor,
    config: FeatureConfig,
    *,
    train: bool = False,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Log-mel features of (N,) or (B, N) audio at 16 kHz -> (T, F) or (B, T, F).

    `train=True` adds dither (tiny noise that keeps digital silence from producing identical
    frames with log-floor values, which would otherwise dominate CMVN statistics).
    """
    if wave.shape[-1] < config.win_length:
        return wave.new_zeros((*wave.shape[:-1], 0, config.num_mel_bins))
    if train and config.dither > 0:
        noise = torch.randn(wave.shape, generator=generator, dtype=wave.dtype)
        wave = wave + config.dither * noise.to(wave.device)
    transform = _mel_transform(config)
    if transform.mel_scale.fb.device != wave.device:  # (moving it costs even when idle)
        transform = transform.to(wave.device)
    mel = transform(wave)  # (..., F, T)
    feats = mel.clamp(min=config.log_floor).log().transpose(-1, -2)  # (..., T, F)
    if config.cepstra is not None:
        smoothing = _smoothing(config)
        feats = feats @ smoothing.to(feats.device, feats.dtype)
    return feats


class StreamingFeatures:
    """Computes `log_mel` incrementally: the concatenation of all `accept` outputs equals
    `log_mel` of the concatenated audio (inference mode, no dither)."""

    def __init__(self, config: FeatureConfig) -> None:
        self.config = config
        self._buffer = torch.zeros(0)
        self.frames_emitted = 0

    def frames_after(self, samples: int) -> int:
        """The frames `accept` would return given `samples` more samples."""
        return self.config.num_frames(self._buffer.numel() + samples)

    def accept(self, samples: torch.Tensor) -> torch.Tensor:
        """Feed (N,) samples; returns the (T', F) frames that became complete."""
        return accept_features([self], [samples])[0]


def accept_features(
    streams: Sequence[StreamingFeatures], samples: Sequence[torch.Tensor]
) -> list[torch.Tensor]:
    """`streams[i].accept(samples[i])` for every stream (all of one config), with the frames
    of all of them computed in one batched `log_mel` call: rows are zero-padded at the end,
    and a frame sees only its own window's samples, so padding changes no frame (the batched
    mel product rounds ~1e-7 differently). A server's streams completing a block together
    pay one STFT call, not one each."""
    if len(streams) != len(samples):
        raise ValueError(f"accept_features: {len(streams)} streams, {len(samples)} chunks")
    if not streams:
        return []
    config = streams[0].config
    if any(s.config != config for s in streams):
        raise ValueError("accept_features: every stream must have the same feature config")
    buffers = [
        torch.cat([s._buffer, x.to(torch.float32)]) for s, x in zip(streams, samples, strict=True)
    ]
    counts = [config.num_frames(b.numel()) for b in buffers]
    out = [torch.zeros(0, config.num_mel_bins) for _ in streams]
    due = [i for i, n in enumerate(counts) if n]
    if due:
        used = [(counts[i] - 1) * config.hop_length + config.win_length for i in due]
        windows = [buffers[i][:n] for i, n in zip(due, used, strict=True)]
        feats = log_mel(pad_sequence(windows, batch_first=True), config)  # (B, T, F)
        for row, i in enumerate(due):  # a copy: a view would keep the whole batch alive
            out[i] = feats[row, : counts[i]] if len(due) == 1 else feats[row, : counts[i]].clone()
    for s, buffer, n in zip(streams, buffers, counts, strict=True):
        # Keep the samples that later frames still need (windows overlap by win - hop).
        s._buffer = buffer[n * config.hop_length :]
        s.frames_emitted += n
    return out


DEFAULT_CMN_PRIOR = 100  # frames (1 s) of the global mean that a sliding window starts from


@dataclass(frozen=True)
class CMVN:
    """Global cepstral mean and variance normalisation statistics over a training set, and
    optionally a causal sliding-window mean normalisation after it (`window` frames, 0: off).

    The sliding mean removes what stays constant over a few seconds (the channel, the level,
    a synthesizer's or microphone's spectral tilt), which global statistics cannot. It is
    causal (frame t sees frames t - window + 1 .. t), so a stream normalises exactly as the
    whole utterance (`stream`); the first frames, with little history, lean on the global
    mean, counted as `prior_frames` frames (as Kaldi's online CMVN starts from global stats).
    """

    mean: tuple[float, ...]
    std: tuple[float, ...]
    frames: int
    window: int = 0
    prior_frames: int = DEFAULT_CMN_PRIOR
    # The features the statistics are of (`asr cmvn --features`): a run trained with them
    # takes its FeatureConfig from here. None: a file written before it was recorded (the
    # default features).
    features: FeatureConfig | None = None

    def __post_init__(self) -> None:
        if self.window < 0 or self.prior_frames < 0:
            raise ValueError(
                f"CMVN window and prior_frames must be >= 0, got {self.window}, {self.prior_frames}"
            )

    def apply(self, feats: torch.Tensor) -> torch.Tensor:
        """Normalise (..., T, F) features (zero-padded at the end, if batched: the window is
        causal, so padding never reaches a real frame). Without a window any (..., F) works."""
        normed = self._global(feats)
        return normed if self.window == 0 else self._slide(normed, normed[..., :0, :])[0]

    def stream(self) -> Callable[[torch.Tensor], torch.Tensor]:
        """A stateful normaliser for one stream: call it on consecutive (..., n, F) chunks; the
        outputs joined equal `apply` on the joined input."""
        history: torch.Tensor | None = None

        def accept(feats: torch.Tensor) -> torch.Tensor:
            nonlocal history
            normed = self._global(feats)
            if self.window == 0:
                return normed
            out, history = self._slide(normed, normed[..., :0, :] if history is None else history)
            return out

        return accept

    @cached_property
    def _stats(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, std) as float32 tensors, made once (a stream normalises every block)."""
        return torch.tensor(self.mean), torch.tensor(self.std)

    def _global(self, feats: torch.Tensor) -> torch.Tensor:
        mean, std = self._stats
        if mean.dtype != feats.dtype or mean.device != feats.device:
            mean, std = mean.to(feats), std.to(feats)
        return (feats - mean) / std

    def _slide(
        self, normed: torch.Tensor, history: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Subtract the causal window mean from (..., n, F) globally normalised frames that
        follow `history` (..., h, F), h < window -> (output, the new history). The global
        mean (zero after `_global`) fills the window with weight `prior_frames`."""
        joined = torch.cat([history, normed], dim=-2).to(torch.float64)
        total = joined.shape[-2]
        cumsum = torch.cat([torch.zeros_like(joined[..., :1, :]), joined.cumsum(-2)], dim=-2)
        ends = torch.arange(history.shape[-2] + 1, total + 1, device=joined.device)
        starts = (ends - self.window).clamp(min=0)
        sums = cumsum[..., ends, :] - cumsum[..., starts, :]
        # A window not yet full is topped up with the prior; a full one still keeps it, so
        # the estimate never rests on a single frame.
        counts = (ends - starts).to(torch.float64)[:, None] + self.prior_frames
        out = (joined[..., history.shape[-2] :, :] - sums / counts.clamp(min=1)).to(normed.dtype)
        return out, joined[..., max(0, total - self.window + 1) :, :].to(normed.dtype)

    def save(self, path: str | Path) -> None:
        data = {"dim": len(self.mean), "frames": self.frames, "mean": self.mean, "std": self.std}
        if self.window:
            data |= {"window": self.window, "prior_frames": self.prior_frames}
        if self.features is not None:
            data["features"] = self.features.to_dict()
        Path(path).write_text(json.dumps(data, indent=1) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> CMVN:
        try:
            data = json.loads(Path(path).read_text())
            mean, std = tuple(map(float, data["mean"])), tuple(map(float, data["std"]))
            frames = int(data["frames"])
            window = int(data.get("window", 0))
            prior = int(data.get("prior_frames", DEFAULT_CMN_PRIOR))
            features = None if "features" not in data else FeatureConfig.from_dict(data["features"])
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
            raise ValueError(f"{path}: not a CMVN statistics file ({err})") from err
        if len(mean) != len(std) or min(std, default=0.0) <= 0:
            raise ValueError(f"{path}: mean/std have different sizes or a non-positive std")
        if features is not None and features.num_mel_bins != len(mean):
            raise ValueError(f"{path}: {len(mean)} dimensions for {features.num_mel_bins} bins")
        try:
            return cls(
                mean=mean,
                std=std,
                frames=frames,
                window=window,
                prior_frames=prior,
                features=features,
            )
        except ValueError as err:
            raise ValueError(f"{path}: {err}") from err


class CMVNAccumulator:
    """Accumulates per-dimension sums in float64 (float32 loses precision over 1e9 frames)."""

    def __init__(self, dim: int) -> None:
        self.sum = torch.zeros(dim, dtype=torch.float64)
        self.sum_sq = torch.zeros(dim, dtype=torch.float64)
        self.frames = 0

    def add(self, feats: torch.Tensor) -> None:
        """Add (T, F) frames."""
        f = feats.to(torch.float64)
        self.sum += f.sum(dim=0)
        self.sum_sq += (f * f).sum(dim=0)
        self.frames += f.shape[0]

    def result(self, min_std: float = 1e-3) -> CMVN:
        if self.frames == 0:
            raise ValueError("no frames accumulated: cannot compute CMVN statistics")
        mean = self.sum / self.frames
        var = (self.sum_sq / self.frames - mean * mean).clamp(min=0.0)
        std = var.sqrt().clamp(min=min_std)  # a constant dimension must not divide by zero
        return CMVN(mean=tuple(mean.tolist()), std=tuple(std.tolist()), frames=self.frames)


@dataclass(frozen=True)
class SpecAugmentConfig(Config):
    """SpecAugment (Park et al. 2019). Defaults follow its LibriSpeech 'LD' policy, with time
    masks capped at a fraction of the utterance so short utterances are not blanked out."""

    freq_masks: int = 2
    freq_width: int = 27  # F: max bins per frequency mask
    time_masks: int = 2
    time_width: int = 100  # T: max frames per time mask
    time_ratio: float = 0.2  # p: a time mask covers at most this fraction of the utterance

    def validate(self) -> None:
        self.check(
            {
                name: (getattr(self, name) >= 0, ">= 0")
                for name in ("freq_masks", "freq_width", "time_masks", "time_width")
            }
            | {"time_ratio": (0.0 <= self.time_ratio <= 1.0, "in [0, 1]")}
        )


def spec_augment(
    feats: torch.Tensor,
    config: SpecAugmentConfig,
    generator: torch.Generator | None = None,
    fill: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mask random frequency bands and time spans of (T, F) features with `fill` (F,), zeros by
    default. Masks of raw log-mel features take the CMVN mean, which the model's normalisation
    turns into the zeros that SpecAugment masks normalised features with."""
    out = feats.clone()
    num_frames, num_bins = out.shape
    value = torch.zeros(num_bins, dtype=out.dtype) if fill is None else fill.to(out.dtype)

    def _randint(high: int) -> int:
        return int(torch.randint(0, max(high, 1), (1,), generator=generator))

    for _ in range(config.freq_masks):
        width = _randint(min(config.freq_width, num_bins) + 1)
        start = _randint(num_bins - width + 1)
        out[:, start : start + width] = value[start : start + width]
    max_time = min(config.time_width, math.floor(config.time_ratio * num_frames))
    for _ in range(config.time_masks):
        width = _randint(max_time + 1)
        start = _randint(num_frames - width + 1)
        out[start : start + width, :] = value
    return out


def speed_perturb(wave: torch.Tensor, factor: float) -> torch.Tensor:
    """Play (N,) 16 kHz audio `factor` times faster (tempo and pitch change together).

    Reinterpreting the samples as recorded at `factor * 16 kHz` and resampling back to 16 kHz
    gives about N / factor samples; 0.9/1.1 reduce to small integer ratios, so this is cheap.
    """
    if factor == 1.0:
        return wave
    return resample(wave, round(SAMPLE_RATE * factor))
