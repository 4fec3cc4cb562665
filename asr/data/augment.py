"""On-the-fly training augmentation that makes new speakers, rooms and channels out of each
utterance, so a model learns speech rather than the few synthesizers (or microphones) it heard.

`Augmenter.wave` transforms (N,) 16 kHz audio and keeps its length; `Augmenter.features`
warps (T, F) log-mel features. Each augmentation fires with its own probability and draws its
strength from a range in the frozen `AugmentConfig`, all from the generator `SpeechDataset`
seeds with (seed, epoch, utterance), so an item is the same in any worker and on resume.

The chain, in the order a sound would meet them:

- **pitch** (sox-style `pitch`): resample by 2^(s/12), then a phase-vocoder time stretch back to
  the original length: pitch and formants move together, duration does not (speed perturbation,
  applied before this by the dataset, moves all three).
- **reverb**: convolution with a room impulse response, measured ones from `rir_dir` or a
  simulated one (see `simulated_rir`).
- **noise** at a random SNR: coloured noise (white, pink, brown), babble (a few other
  training utterances summed), or recorded noise from `noise_dir` (MUSAN-style corpora).
- **equalizer**: random peaking bands and a random low-pass: the spectral tilt and band edges
  that differ between synthesizers, microphones and codecs.
- **channel**: a telephone line (8 kHz, 300-3400 Hz, optionally mu-law / A-law / GSM 6.10) or a
  wideband lossy codec (Vorbis, Opus, MP3), each a real round trip through libsndfile.
- **gain**, with clipping at full scale where it overdrives.
- **vtlp** (Jaitly & Hinton 2013), on the features: the frequency axis warped by a factor
  alpha near 1, a new vocal-tract length for the same words.
"""

from __future__ import annotations

import functools
import io
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import soundfile as sf
import torch
import torchaudio.functional as AF

from asr.audio import SAMPLE_RATE, load_audio, resample
from asr.config import Config
from asr.features import FeatureConfig, mel_centres

NoiseKind = Literal["white", "pink", "brown", "babble", "file"]
Codec = Literal["ulaw", "alaw", "gsm", "vorbis", "opus", "mp3"]
NARROWBAND_CODECS: tuple[Codec, ...] = ("ulaw", "alaw", "gsm")
WIDEBAND_CODECS: tuple[Codec, ...] = ("vorbis", "opus", "mp3")
# libsndfile (format, subtype) of each codec's round trip; GSM 6.10 exists only at 8 kHz.
_CODEC_FORMATS: dict[Codec, tuple[str, str]] = {
    "ulaw": ("WAV", "ULAW"),
    "alaw": ("WAV", "ALAW"),
    "gsm": ("WAV", "GSM610"),
    "vorbis": ("OGG", "VORBIS"),
    "opus": ("OGG", "OPUS"),
    "mp3": ("MP3", "MPEG_LAYER_III"),
}
AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".mp3")
TELEPHONE_RATE = 8000
TELEPHONE_BAND = (300.0, 3400.0)  # Hz: the ITU-T G.712 voice channel
_EPS = 1e-10


def _range(low: float, high: float) -> tuple[bool, str]:
    return low <= high, "a (low, high) pair with low <= high"


@dataclass(frozen=True)
class AugmentConfig(Config):
    """What `Augmenter` does; each `*_prob` is the chance an utterance gets that augmentation,
    each pair a uniform range. `prob` is the chance an utterance goes through the chain at
    all: the model still hears clean speech, and a short training run still converges.

    `prob` and `vtlp_prob` 0.3 did best of 0.15, 0.3 and 0.5 on held-out engines in the
    demo-sized ablation (12 epochs, recipes/synthetic/README.md); 0.5 trained too slowly."""

    prob: float = 0.3
    pitch_prob: float = 0.3
    pitch_semitones: tuple[float, float] = (-3.0, 3.0)
    reverb_prob: float = 0.3
    rt60: tuple[float, float] = (0.15, 0.7)  # seconds, for simulated rooms
    rir_dir: str | None = None  # measured impulse responses (AUDIO_SUFFIXES) instead of simulated
    noise_prob: float = 0.5
    snr_db: tuple[float, float] = (5.0, 30.0)
    # "file" needs `noise_dir`; babble needs other utterances (the dataset passes them).
    noise_kinds: tuple[NoiseKind, ...] = ("white", "pink", "brown", "babble")
    babble_talkers: tuple[int, int] = (3, 6)
    noise_dir: str | None = None
    eq_prob: float = 0.5
    eq_bands: int = 3  # peaking filters per equalised utterance
    eq_gain_db: float = 10.0  # each band's gain is uniform in [-eq_gain_db, eq_gain_db]
    lowpass_hz: tuple[float, float] = (3500.0, 7600.0)  # the equalizer's random band edge
    telephone_prob: float = 0.1
    codec_prob: float = 0.1  # a wideband codec, for utterances that got no telephone line
    gain_prob: float = 0.5
    gain_db: tuple[float, float] = (-15.0, 5.0)  # the RMS level relative to -20 dBFS
    vtlp_prob: float = 0.3
    vtlp_alpha: tuple[float, float] = (0.85, 1.15)

    def validate(self) -> None:
        probs = [name for name in vars(self) if name.endswith("prob")]
        self.check(
            {name: (0.0 <= getattr(self, name) <= 1.0, "in [0, 1]") for name in probs}
            | {
                name: _range(*getattr(self, name))
                for name in ("pitch_semitones", "snr_db", "gain_db")
            }
            | {
                "rt60": (0.0 < self.rt60[0] <= self.rt60[1] <= 5.0, "within (0, 5] s"),
                "noise_kinds": (
                    len(self.noise_kinds) > 0
                    and ("file" not in self.noise_kinds or self.noise_dir is not None),
                    "non-empty, and 'file' only with noise_dir",
                ),
                "babble_talkers": (
                    1 <= self.babble_talkers[0] <= self.babble_talkers[1],
                    "a (low, high) pair with 1 <= low <= high",
                ),
                "eq_bands": (self.eq_bands >= 0, ">= 0"),
                "eq_gain_db": (self.eq_gain_db >= 0, ">= 0"),
                "lowpass_hz": (
                    0 < self.lowpass_hz[0] <= self.lowpass_hz[1] <= SAMPLE_RATE / 2,
                    f"a (low, high) pair within (0, {SAMPLE_RATE // 2}] Hz",
                ),
                "vtlp_alpha": (
                    0 < self.vtlp_alpha[0] <= self.vtlp_alpha[1],
                    "a (low, high) pair with 0 < low <= high",
                ),
            }
        )


# ---- the generator-driven draws every augmentation uses ----------------------------------


def _uniform(gen: torch.Generator | None, low: float, high: float) -> float:
    return low + (high - low) * float(torch.rand((), generator=gen))


def _chance(gen: torch.Generator | None, prob: float) -> bool:
    return float(torch.rand((), generator=gen)) < prob


def _pick(gen: torch.Generator | None, count: int) -> int:
    return int(torch.randint(count, (), generator=gen))


def _fit(wave: torch.Tensor, length: int) -> torch.Tensor:
    """Trim or zero-pad (N,) audio to `length` samples."""
    if wave.numel() >= length:
        return wave[:length]
    return torch.cat([wave, wave.new_zeros(length - wave.numel())])


def _power(wave: torch.Tensor) -> float:
    return float(wave.double().square().mean())


def _match_level(wave: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """`wave` scaled to the mean power of `reference`."""
    return wave * math.sqrt(_power(reference) / max(_power(wave), _EPS))


# ---- the augmentations, each usable on its own ------------------------------------------


def pitch_shift(wave: torch.Tensor, semitones: float) -> torch.Tensor:
    """Shift (N,) 16 kHz audio by `semitones` keeping its length: resample (pitch and formants
    move, duration shrinks or grows), then stretch back with a phase vocoder."""
    if semitones == 0 or wave.numel() == 0:
        return wave
    length = wave.numel()
    # Played at `factor` x 16 kHz: `asr.audio.resample` rounds the rate to a cheap filter.
    shifted = resample(wave, round(SAMPLE_RATE * 2 ** (semitones / 12)))
    n_fft, hop = 512, 128
    window = torch.hann_window(n_fft)
    spec = torch.stft(shifted, n_fft, hop, window=window, return_complex=True)
    phase_advance = torch.linspace(0, math.pi * hop, n_fft // 2 + 1)[:, None]
    stretched = AF.phase_vocoder(spec, shifted.numel() / length, phase_advance)
    out = torch.istft(stretched, n_fft, hop, window=window, length=length)
    return _match_level(out, wave)  # the vocoder's stretched frames overlap with less energy


def simulated_rir(rt60: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """A room impulse response (K,) with reverberation time `rt60` seconds.

    The statistical model of late reverberation (Polack 1988; the tail of Lehmann & Johansson's
    image-source simulator): Gaussian noise under an envelope decaying 60 dB in rt60, after a
    unit direct path and a few sparse early reflections. Why not an image-source simulator
    (pyroomacoustics): measured on the 2-core machine it takes 0.45 s per response at RT60
    0.5 s and 1.9 s at 0.9 s, in every data-loader step, where this takes well under 1 ms; it
    is the diffuse tail that smears spectra and the model must learn to see through.
    """
    length = max(1, round(rt60 * SAMPLE_RATE))
    t = torch.arange(length, dtype=torch.float32) / SAMPLE_RATE
    decay = torch.exp(-3 * math.log(10) * t / rt60)  # -60 dB at t = rt60
    # The direct-to-reverberant ratio falls as rooms get more reverberant.
    tail_gain = 10 ** (_uniform(generator, -12.0, 0.0) / 20)
    onset = round(_uniform(generator, 0.005, 0.02) * SAMPLE_RATE)  # first reflection, 5-20 ms
    tail = torch.randn(length, generator=generator) * decay
    tail[:onset] = 0
    tail *= tail_gain / max(float(tail.abs().max()), _EPS)
    for _ in range(4):  # early reflections, each weaker and later
        at = onset + _pick(generator, max(1, round(0.03 * SAMPLE_RATE)))
        if at < length:
            tail[at] += float(decay[at]) * _uniform(generator, -0.7, 0.7)
    tail[0] = 1.0  # direct path: the output stays aligned with the input
    return tail


def reverberate(wave: torch.Tensor, rir: torch.Tensor) -> torch.Tensor:
    """Convolve (N,) audio with the impulse response (K,), aligned on the RIR's strongest
    tap (the direct path), at the input's level, same length."""
    if wave.numel() == 0:
        return wave
    peak = int(rir.abs().argmax())
    wet = AF.fftconvolve(wave, rir.to(wave.dtype))[peak : peak + wave.numel()]
    return _match_level(_fit(wet, wave.numel()), wave)


def coloured_noise(
    length: int, exponent: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """(length,) noise with power spectral density ~ 1/f^exponent (0 white, 1 pink, 2 brown),
    shaped in the frequency domain, unit power."""
    white = torch.randn(length, generator=generator)
    if exponent == 0 or length < 2:
        return white
    spec = torch.fft.rfft(white)
    freqs = torch.fft.rfftfreq(length)
    freqs[0] = freqs[1]  # no infinite DC
    noise = torch.fft.irfft(spec / freqs ** (exponent / 2), n=length)
    return noise / math.sqrt(max(_power(noise), _EPS))


COLOURS: dict[str, float] = {"white": 0.0, "pink": 1.0, "brown": 2.0}


def _coloured(exponent: float, length: int, generator: torch.Generator | None) -> torch.Tensor:
    return coloured_noise(length, exponent, generator)


def add_noise(wave: torch.Tensor, noise: torch.Tensor, snr_db: float) -> torch.Tensor:
    """(N,) audio plus (N,) noise scaled so that the signal-to-noise ratio (mean power over the
    whole utterance) is exactly `snr_db`."""
    scale = math.sqrt(_power(wave) / max(_power(noise), _EPS) / 10 ** (snr_db / 10))
    return wave + scale * noise.to(wave.dtype)


def equalize(
    wave: torch.Tensor,
    bands: Sequence[tuple[float, float, float]],
    lowpass_hz: float | None,
) -> torch.Tensor:
    """Peaking filters (centre Hz, gain dB, Q) and an optional low-pass edge on (N,) audio."""
    out = wave
    for centre, gain, q in bands:
        out = AF.equalizer_biquad(out, SAMPLE_RATE, centre, gain, q)
    if lowpass_hz is not None and lowpass_hz < SAMPLE_RATE / 2:
        out = AF.lowpass_biquad(out, SAMPLE_RATE, lowpass_hz)
    return out


def codec_round_trip(wave: torch.Tensor, codec: Codec, rate: int = SAMPLE_RATE) -> torch.Tensor:
    """Encode (N,) audio at `rate` with a lossy codec through libsndfile and decode it again,
    same length (codecs may add priming samples or pad the last frame)."""
    fmt, subtype = _CODEC_FORMATS[codec]
    buf = io.BytesIO()
    sf.write(buf, wave.clamp(-1, 1).numpy(), rate, format=fmt, subtype=subtype)
    buf.seek(0)
    data, _ = sf.read(buf, dtype="float32", always_2d=True)
    return _fit(torch.from_numpy(data[:, 0].copy()), wave.numel())


def telephone(wave: torch.Tensor, codec: Codec | None = None) -> torch.Tensor:
    """A telephone channel on (N,) 16 kHz audio: down to 8 kHz, the 300-3400 Hz voice band, an
    optional narrowband codec, back up to 16 kHz (same length)."""
    narrow = AF.resample(wave, SAMPLE_RATE, TELEPHONE_RATE)
    narrow = AF.highpass_biquad(narrow, TELEPHONE_RATE, TELEPHONE_BAND[0])
    narrow = AF.lowpass_biquad(narrow, TELEPHONE_RATE, TELEPHONE_BAND[1])
    if codec is not None:
        narrow = codec_round_trip(narrow, codec, TELEPHONE_RATE)
    return _fit(resample(narrow, TELEPHONE_RATE), wave.numel())


def apply_gain(wave: torch.Tensor, gain_db: float) -> torch.Tensor:
    """Scale (N,) audio by `gain_db`, clipping at full scale as an overdriven input would."""
    return (wave * 10 ** (gain_db / 20)).clamp(-1.0, 1.0)


def vtlp(feats: torch.Tensor, alpha: float, config: FeatureConfig) -> torch.Tensor:
    """Vocal tract length perturbation of (T, F) log-mel features: the spectrum's frequency
    axis scaled by `alpha` (> 1 moves formants up, as a shorter vocal tract does), piecewise
    linear so the band edge stays put (Jaitly & Hinton 2013), by interpolating between bins."""
    if alpha == 1.0 or feats.shape[0] == 0:
        return feats
    centres = mel_centres(config).to(feats.dtype)
    f_hi = 0.8 * config.f_max  # warp linearly up to here, then join the top edge
    boundary = f_hi * min(alpha, 1.0) / alpha
    # Output bin at frequency f shows what the original had at warp^-1(f).
    lo, top = config.f_min, config.f_max
    inverse = torch.where(
        centres <= boundary * alpha,
        centres / alpha,
        boundary + (centres - boundary * alpha) * (top - boundary) / (top - boundary * alpha),
    ).clamp(lo, top)
    # Fractional index of each source frequency among the bin centres.
    pos = torch.searchsorted(centres, inverse).clamp(1, len(centres) - 1)
    left, right = centres[pos - 1], centres[pos]
    frac = ((inverse - left) / (right - left)).clamp(0, 1)
    return feats[:, pos - 1] * (1 - frac) + feats[:, pos] * frac


# ---- the chain ---------------------------------------------------------------------------


def _audio_files(directory: str, what: str) -> list[Path]:
    root = Path(directory)
    if not root.is_dir():
        raise ValueError(f"{what} {directory!r} is not a directory")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in AUDIO_SUFFIXES)
    if not files:
        raise ValueError(f"{what} {directory!r} holds no audio files ({', '.join(AUDIO_SUFFIXES)})")
    return files


def _segment(path: Path, length: int, generator: torch.Generator | None) -> torch.Tensor:
    """A random `length`-sample stretch of a recording (looped when shorter), read without
    decoding the rest of a long noise file."""
    info = sf.info(str(path))
    frames = round(length * info.samplerate / SAMPLE_RATE) + 1
    start = _pick(generator, max(1, info.frames - frames + 1))
    data, rate = sf.read(str(path), start=start, frames=frames, dtype="float32", always_2d=True)
    wave = resample(torch.from_numpy(data.mean(axis=1)), rate)
    if wave.numel() == 0:
        return torch.zeros(length)
    return wave.repeat(math.ceil(length / wave.numel()))[:length]


class Augmenter:
    """Applies an `AugmentConfig` to one utterance at a time; `babble` lists the audio files
    (other training utterances) that babble noise is made of."""

    def __init__(
        self,
        config: AugmentConfig,
        feature_config: FeatureConfig,
        babble: Sequence[str | Path] = (),
    ) -> None:
        self.config = config
        self.feature_config = feature_config
        self.babble = [str(p) for p in babble]
        self.noise_files = _audio_files(config.noise_dir, "noise_dir") if config.noise_dir else []
        self.rir_files = _audio_files(config.rir_dir, "rir_dir") if config.rir_dir else []
        kinds = [k for k in config.noise_kinds if k != "babble" or self.babble]
        if not kinds:
            raise ValueError("noise_kinds is only 'babble', and there are no utterances to make it")
        self.noise_kinds = tuple(kinds)
        self._noise: dict[str, Callable[[int, torch.Generator | None], torch.Tensor]] = {
            **{
                colour: functools.partial(_coloured, exponent)
                for colour, exponent in COLOURS.items()
            },
            "babble": self._babble,
            "file": self._recorded,
        }

    def _recorded(self, length: int, generator: torch.Generator | None) -> torch.Tensor:
        return _segment(
            self.noise_files[_pick(generator, len(self.noise_files))], length, generator
        )

    def _babble(self, length: int, generator: torch.Generator | None) -> torch.Tensor:
        low, high = self.config.babble_talkers
        talkers = low + _pick(generator, high - low + 1)
        out = torch.zeros(length)
        for _ in range(talkers):
            voice = load_audio(self.babble[_pick(generator, len(self.babble))])
            if voice.numel() == 0:
                continue
            voice = voice.repeat(math.ceil(length / voice.numel()) + 1)
            start = _pick(generator, voice.numel() - length + 1)
            chunk = voice[start : start + length]
            out += chunk / math.sqrt(max(_power(chunk), _EPS))  # talkers at equal level
        return out

    def _rir(self, generator: torch.Generator | None) -> torch.Tensor:
        if self.rir_files:
            return load_audio(self.rir_files[_pick(generator, len(self.rir_files))])
        return simulated_rir(_uniform(generator, *self.config.rt60), generator)

    def wave(self, wave: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """Augment (N,) 16 kHz audio -> (N,): same length, finite."""
        cfg, gen = self.config, generator
        length = wave.numel()
        if length == 0 or not _chance(gen, cfg.prob):
            return wave
        if _chance(gen, cfg.pitch_prob):
            wave = pitch_shift(wave, _uniform(gen, *cfg.pitch_semitones))
        if _chance(gen, cfg.reverb_prob):
            wave = reverberate(wave, self._rir(gen))
        if _chance(gen, cfg.noise_prob):
            kind = self.noise_kinds[_pick(gen, len(self.noise_kinds))]
            wave = add_noise(wave, self._noise[kind](length, gen), _uniform(gen, *cfg.snr_db))
        if _chance(gen, cfg.eq_prob):
            bands = [
                (
                    math.exp(_uniform(gen, math.log(100.0), math.log(6000.0))),
                    _uniform(gen, -cfg.eq_gain_db, cfg.eq_gain_db),
                    _uniform(gen, 0.5, 2.0),
                )
                for _ in range(cfg.eq_bands)
            ]
            wave = equalize(wave, bands, _uniform(gen, *cfg.lowpass_hz))
        if _chance(gen, cfg.telephone_prob):
            codecs = (None, *NARROWBAND_CODECS)
            wave = telephone(wave, codecs[_pick(gen, len(codecs))])
        elif _chance(gen, cfg.codec_prob):
            wave = codec_round_trip(wave, WIDEBAND_CODECS[_pick(gen, len(WIDEBAND_CODECS))])
        if _chance(gen, cfg.gain_prob):
            # Quiet, or loud enough to clip now and then: from the level, not the input's gain.
            level_db = 10 * math.log10(max(_power(wave), _EPS))
            wave = apply_gain(wave, -20.0 - level_db + _uniform(gen, *cfg.gain_db))
        wave = torch.nan_to_num(wave, nan=0.0, posinf=1.0, neginf=-1.0)
        return _fit(wave.to(torch.float32), length)

    def features(self, feats: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """Augment (T, F) log-mel features -> (T, F) (independently of `prob`: a new vocal
        tract is a new speaker, not a harder recording)."""
        if _chance(generator, self.config.vtlp_prob):
            feats = vtlp(feats, _uniform(generator, *self.config.vtlp_alpha), self.feature_config)
        return feats
