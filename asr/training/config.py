"""Training configuration: optimisation, batching, augmentation, checkpointing.

The model's own config lives beside the model (`BiLSTMCTCConfig`, `LASConfig`); this one holds
only how it is trained, and is saved in every checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from asr.config import Config
from asr.data.augment import AugmentConfig
from asr.features import SpecAugmentConfig

Precision = Literal["fp32", "bf16", "fp16"]


@dataclass(frozen=True)
class TrainConfig(Config):
    epochs: int = 30
    max_frames: int = 20_000  # padded feature frames per batch per rank (200 s of audio)
    max_batch_size: int | None = None
    num_buckets: int = 20
    optimizer: Literal["adam", "adamw"] = "adamw"
    lr: float = 1e-3  # peak, reached at the end of warmup
    min_lr_ratio: float = 0.05  # cosine decay floor, as a fraction of the peak
    weight_decay: float = 1e-2
    warmup_steps: int = 1000
    grad_clip: float = 5.0  # global gradient norm; RNNs diverge without it
    accum_steps: int = 1  # gradient accumulation: effective batch = accum_steps * world * batch
    precision: Precision = "bf16"  # autocast dtype on CUDA; CPU always trains in fp32
    seed: int = 0
    num_workers: int = 2  # DataLoader processes per rank
    speed_perturb: bool = True
    spec_augment: SpecAugmentConfig | None = field(default_factory=SpecAugmentConfig)
    # Noise, reverberation, channels, pitch, VTLP (asr.data.augment); None: off, as for real
    # read speech where speed perturbation and SpecAugment are the standard. `--set augment={}`
    # turns it on with the defaults, `--set 'augment={"noise_dir": "musan/noise"}'` tunes it.
    augment: AugmentConfig | None = None
    checkpoint_every: int = 1000  # optimizer steps; a checkpoint is also written every epoch
    keep_last: int = 5
    log_every: int = 50
    valid_max_utterances: int | None = None  # cap dev decoding time on huge dev sets

    def validate(self) -> None:
        positive = ("epochs", "max_frames", "num_buckets", "warmup_steps", "accum_steps")
        self.check(
            {name: (getattr(self, name) >= 1, ">= 1") for name in positive}
            | {
                "lr": (self.lr > 0, "> 0"),
                "min_lr_ratio": (0 <= self.min_lr_ratio <= 1, "in [0, 1]"),
            }
        )


# Training settings that go with the model presets of the same name. The big ones assume GPUs
# (per-rank batch budgets); cpu-small is for a 2-core machine and a synthetic corpus.
PRESETS: dict[str, TrainConfig] = {
    "librispeech-100h": TrainConfig(
        epochs=60, max_frames=40_000, lr=1e-3, warmup_steps=2_000, checkpoint_every=2_000
    ),
    "librispeech-960h": TrainConfig(
        epochs=40, max_frames=60_000, lr=1e-3, warmup_steps=10_000, checkpoint_every=5_000
    ),
    "cpu-small": TrainConfig(
        epochs=30,
        max_frames=12_000,
        lr=2e-3,
        warmup_steps=200,
        weight_decay=1e-3,
        num_workers=1,
        checkpoint_every=200,
        log_every=10,
        spec_augment=SpecAugmentConfig(freq_masks=2, freq_width=15, time_masks=2, time_width=40),
    ),
}
