from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from asr.data.dataset import IGNORE_ID, SpeechDataset, collate, manifest_cmvn
from asr.data.librispeech import prepare
from asr.data.manifest import Utterance, read_manifest
from asr.data.sampler import BucketingBatchSampler
from asr.features import FeatureConfig, SpecAugmentConfig
from asr.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def dev(librispeech_root: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Utterance]:
    out = tmp_path_factory.mktemp("manifests")
    prepare(librispeech_root, ["dev-clean"], out)
    return read_manifest(out / "dev-clean.jsonl")


@pytest.fixture(scope="module")
def tokenizer(dev: list[Utterance]) -> Tokenizer:
    return Tokenizer.train([u.text for u in dev], "char", 40)


def test_eval_items_are_exact(dev: list[Utterance], tokenizer: Tokenizer) -> None:
    ds = SpeechDataset(dev, tokenizer, FeatureConfig())
    assert ds.num_frames == [ds[i].feats.shape[0] for i in range(len(ds))]
    item = ds[0]
    assert item.feats.shape[1] == 80 and item.feats.dtype == torch.float32
    assert tokenizer.decode(item.tokens.tolist()) == dev[0].text
    assert torch.equal(ds[0].feats, item.feats)  # no randomness outside training
    # Raw log-mel features (models normalise their input), the very ones CMVN is taken over.
    everything = torch.cat([ds[i].feats for i in range(len(ds))])
    cmvn = manifest_cmvn(dev, FeatureConfig())
    assert torch.allclose(
        everything.double().mean(0), torch.tensor(cmvn.mean, dtype=torch.float64), atol=1e-3
    )


def test_spec_augment_masks_with_the_cmvn_mean(dev: list[Utterance], tokenizer: Tokenizer) -> None:
    """Masked raw frames normalise to zero, as SpecAugment of normalised features masks."""
    cmvn = manifest_cmvn(dev, FeatureConfig())
    plain = SpeechDataset(dev, tokenizer, FeatureConfig(), train=True, speed_factors=(1.0,))
    masked = SpeechDataset(
        dev, tokenizer, FeatureConfig(), cmvn=cmvn, train=True, speed_factors=(1.0,),
        spec_augment=SpecAugmentConfig(time_ratio=0.5),
    )  # fmt: skip
    raw, out = plain[2].feats, masked[2].feats
    changed = (raw != out).any(dim=1)  # frames a time mask or a band covered
    assert changed.any()
    normed = cmvn.apply(out)
    frames = (normed.abs() < 1e-5).all(dim=1)  # whole frames at the mean: time masks
    assert frames.any() and (changed | ~frames).all()
    assert torch.equal(out[~changed], raw[~changed])


def test_training_randomness_is_per_epoch_and_reproducible(dev, tokenizer) -> None:
    ds = SpeechDataset(
        dev, tokenizer, FeatureConfig(), train=True, spec_augment=SpecAugmentConfig()
    )
    first = ds[3].feats
    assert torch.equal(first, ds[3].feats)  # same (seed, epoch, index) -> same item
    lengths = set()
    for epoch in range(6):
        ds.set_epoch(epoch)
        lengths.add(ds[3].feats.shape[0])
    assert len(lengths) > 1  # speed perturbation changes the length across epochs
    ds.set_epoch(0)
    assert torch.equal(first, ds[3].feats)


def test_loader_with_bucketing_sampler(dev: list[Utterance], tokenizer: Tokenizer) -> None:
    ds = SpeechDataset(dev, tokenizer, FeatureConfig())
    sampler = BucketingBatchSampler(ds.num_frames, max_frames=1200, num_buckets=2)
    loader = DataLoader(ds, batch_sampler=sampler, collate_fn=collate, num_workers=2)
    seen = []
    for batch in loader:
        b, t, f = batch.feats.shape
        assert f == 80 and b * t <= 1200 and int(batch.feat_lens.max()) == t
        for i in range(b):
            n = int(batch.target_lens[i])
            assert (batch.targets[i, n:] == IGNORE_ID).all() and (batch.targets[i, :n] >= 0).all()
            assert (batch.feats[i, int(batch.feat_lens[i]) :] == 0).all()
        seen += batch.ids
    too_long = [i for i, n in enumerate(ds.num_frames) if n > 1200]
    assert too_long and sampler.excluded == too_long
    assert sorted(seen) == sorted(u.id for i, u in enumerate(dev) if i not in too_long)
