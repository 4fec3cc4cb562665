"""Training/evaluation dataset over a manifest: audio -> (perturbed) features -> token targets."""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch.nn.utils.rnn import pad_sequence
from torch.utils.data import DataLoader, Dataset

from asr.audio import SAMPLE_RATE, load_audio
from asr.data.augment import AugmentConfig, Augmenter
from asr.data.manifest import Utterance
from asr.features import (
    CMVN,
    SPEED_FACTORS,
    CMVNAccumulator,
    FeatureConfig,
    SpecAugmentConfig,
    log_mel,
    spec_augment,
    speed_perturb,
)
from asr.text import normalize_text
from asr.tokenizer import Tokenizer

IGNORE_ID = -1  # target padding; CTC reads only target_lens, attention losses ignore it


@dataclass(frozen=True)
class Example:
    id: str
    feats: torch.Tensor  # (T, F)
    tokens: torch.Tensor  # (U,) int64


@dataclass(frozen=True)
class Batch:
    ids: list[str]
    feats: torch.Tensor  # (B, T, F), zero-padded
    feat_lens: torch.Tensor  # (B,) int64
    targets: torch.Tensor  # (B, U) int64, padded with IGNORE_ID
    target_lens: torch.Tensor  # (B,) int64

    def inputs(self) -> tuple[torch.Tensor, ...]:
        """The model's forward arguments."""
        return self.feats, self.feat_lens, self.targets, self.target_lens

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        def move(t: torch.Tensor) -> torch.Tensor:
            return t.to(device, non_blocking=non_blocking)

        return Batch(
            self.ids,
            move(self.feats),
            move(self.feat_lens),
            move(self.targets),
            move(self.target_lens),
        )


class SpeechDataset(Dataset[Example]):
    """Items are computed on the fly (in DataLoader workers) so augmentation differs per epoch.

    Training randomness (speed factor, `augment`, dither, SpecAugment masks) is drawn from a
    generator seeded by (seed, epoch, index): an item is reproducible in any worker, in any
    order, which is what makes a resumed run see exactly the data the interrupted one would
    have.
    """

    def __init__(
        self,
        utterances: Sequence[Utterance],
        tokenizer: Tokenizer,
        feature_config: FeatureConfig,
        *,
        cmvn: CMVN | None = None,
        train: bool = False,
        speed_factors: Sequence[float] = SPEED_FACTORS,
        spec_augment: SpecAugmentConfig | None = None,
        augment: AugmentConfig | None = None,
        seed: int = 0,
    ) -> None:
        self.utterances = list(utterances)
        self.tokenizer = tokenizer
        self.feature_config = feature_config
        # Items are raw log-mel features (models normalise their input); SpecAugment masks
        # with the CMVN mean, which normalises to zero.
        self.mask_value = None if cmvn is None else torch.tensor(cmvn.mean)
        self.train = train
        self.speed_factors = tuple(speed_factors) if train else (1.0,)
        self.spec_augment = spec_augment if train else None
        # Babble is made of the other training utterances.
        self.augmenter = (
            Augmenter(augment, feature_config, babble=[u.path for u in self.utterances])
            if train and augment is not None
            else None
        )
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.utterances)

    @property
    def num_frames(self) -> list[int]:
        """Feature frames per utterance at speed 1.0, from the manifest (for batch sampling)."""
        cfg = self.feature_config
        return [cfg.num_frames(round(u.duration * SAMPLE_RATE)) for u in self.utterances]

    def _generator(self, index: int) -> torch.Generator:
        key = f"{self.seed}:{self.epoch}:{index}".encode()
        return torch.Generator().manual_seed(zlib.crc32(key))

    def __getitem__(self, index: int) -> Example:
        utt = self.utterances[index]
        wave = load_audio(utt.path)
        gen = self._generator(index) if self.train else None
        if len(self.speed_factors) > 1:
            choice = int(torch.randint(len(self.speed_factors), (1,), generator=gen))
            wave = speed_perturb(wave, self.speed_factors[choice])
        if self.augmenter is not None:
            wave = self.augmenter.wave(wave, gen)
        feats = log_mel(wave, self.feature_config, train=self.train, generator=gen)
        if self.augmenter is not None:
            feats = self.augmenter.features(feats, gen)
        if self.spec_augment is not None:
            feats = spec_augment(feats, self.spec_augment, gen, self.mask_value)
        tokens = torch.tensor(self.tokenizer.encode(normalize_text(utt.text)), dtype=torch.long)
        return Example(utt.id, feats, tokens)


def collate(examples: Sequence[Example]) -> Batch:
    """Pad a list of examples into a `Batch`."""
    return Batch(
        ids=[e.id for e in examples],
        feats=pad_sequence([e.feats for e in examples], batch_first=True),
        feat_lens=torch.tensor([e.feats.shape[0] for e in examples], dtype=torch.long),
        targets=pad_sequence(
            [e.tokens for e in examples], batch_first=True, padding_value=IGNORE_ID
        ),
        target_lens=torch.tensor([e.tokens.numel() for e in examples], dtype=torch.long),
    )


class _Features(Dataset[torch.Tensor]):
    def __init__(self, utterances: Sequence[Utterance], config: FeatureConfig) -> None:
        self.utterances, self.config = utterances, config

    def __len__(self) -> int:
        return len(self.utterances)

    def __getitem__(self, index: int) -> torch.Tensor:
        return log_mel(load_audio(self.utterances[index].path), self.config)


def manifest_cmvn(
    utterances: Sequence[Utterance],
    config: FeatureConfig,
    *,
    max_utterances: int | None = None,
    workers: int = 0,
) -> CMVN:
    """Global CMVN over (an evenly spaced subset of) a manifest, decoding in `workers` processes.

    Statistics converge long before a whole 960 h corpus is read, hence `max_utterances`.
    """
    chosen = list(utterances)
    if max_utterances is not None and len(chosen) > max_utterances:
        step = len(chosen) / max_utterances
        chosen = [chosen[int(i * step)] for i in range(max_utterances)]
    loader = DataLoader(_Features(chosen, config), batch_size=None, num_workers=workers)
    acc = CMVNAccumulator(config.num_mel_bins)
    for feats in loader:
        acc.add(feats)
    return acc.result()
