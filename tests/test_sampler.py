"""Tests for asr.data.sampler.BucketingBatchSampler."""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
import pytest
import torch.utils.data

from asr.data.sampler import BucketingBatchSampler


def _random_lengths(rng: np.random.Generator, n: int, low: int = 50, high: int = 3500) -> list[int]:
    # Log-uniform-ish spread, like real speech (many short, a long tail).
    return np.exp(rng.uniform(np.log(low), np.log(high), size=n)).astype(int).tolist()


def _all_ranks(
    lengths: list[int], world_size: int, epoch: int = 0, **kwargs: Any
) -> list[list[list[int]]]:
    """Batches of every rank for ``epoch``, each rank from its own sampler (as under DDP)."""
    out = []
    for rank in range(world_size):
        s = BucketingBatchSampler(lengths, rank=rank, world_size=world_size, **kwargs)
        s.set_epoch(epoch)
        out.append(list(s))
    return out


def _padded(batch: list[int], lengths: list[int]) -> int:
    return len(batch) * max(lengths[i] for i in batch)


# ----------------------------------------------------------------- coverage and DDP sharding


@pytest.mark.parametrize("world_size", [1, 2, 3, 8])
@pytest.mark.parametrize("shuffle", [True, False])
def test_every_utterance_exactly_once_and_equal_steps(world_size: int, shuffle: bool) -> None:
    rng = np.random.default_rng(world_size)
    lengths = _random_lengths(rng, 2000)
    for epoch in (0, 1, 5):
        per_rank = _all_ranks(lengths, world_size, epoch, max_frames=8000, shuffle=shuffle)
        counts = {len(b) for b in per_rank}
        assert len(counts) == 1, f"unequal steps per rank: {[len(b) for b in per_rank]}"
        seen = [i for batches in per_rank for batch in batches for i in batch]
        assert sorted(seen) == list(range(len(lengths)))


def test_len_matches_iteration_on_every_rank() -> None:
    lengths = _random_lengths(np.random.default_rng(1), 777)
    for rank in range(3):
        s = BucketingBatchSampler(lengths, max_frames=5000, rank=rank, world_size=3, seed=4)
        for epoch in range(3):
            s.set_epoch(epoch)
            assert len(s) == len(list(s)) == len(s.batches_for_epoch(epoch))


def test_batches_are_split_to_make_count_divisible_by_world_size() -> None:
    # 7 equal utterances of 10 frames, one bucket, budget 30 -> greedy gives [3, 3, 1]: 3
    # batches. Two ranks need an even count, so the biggest batch is split: 4 batches, 2 each.
    lengths = [10] * 7
    single = BucketingBatchSampler(lengths, max_frames=30, num_buckets=1, shuffle=False)
    assert [len(b) for b in single] == [3, 3, 1]
    per_rank = _all_ranks(lengths, 2, max_frames=30, num_buckets=1, shuffle=False)
    assert [len(b) for b in per_rank] == [2, 2]
    # The first of the two biggest batches was halved (ceil first): [2, 1, 3, 1] in order.
    assert [len(b) for batches in zip(*per_rank, strict=True) for b in batches] == [2, 1, 3, 1]
    assert sorted(i for batches in per_rank for b in batches for i in b) == list(range(7))


def test_splitting_impossible_raises() -> None:
    # Fewer utterances than ranks: some rank would have nothing to do at the first step.
    with pytest.raises(ValueError, match="world_size=4"):
        BucketingBatchSampler([10, 10, 10], max_frames=100, world_size=4)
    # Five utterances, each its own batch (budget fits one), four ranks: 5 batches can never
    # become 8 by splitting batches of one.
    with pytest.raises(ValueError, match="never a multiple of 4"):
        BucketingBatchSampler([10] * 5, max_frames=15, world_size=4)


# ------------------------------------------------------------------------------ frame budget


def test_budget_never_exceeded_random_configs() -> None:
    rng = np.random.default_rng(1234)
    for _ in range(60):
        n = int(rng.integers(1, 600))
        lengths = _random_lengths(rng, n, low=1, high=int(rng.integers(2, 5000)))
        max_frames = int(rng.integers(1, 12_000))
        num_buckets = int(rng.integers(1, 40))
        max_batch_size = None if rng.random() < 0.5 else int(rng.integers(1, 64))
        world_size = int(rng.integers(1, 5))
        shuffle = bool(rng.random() < 0.7)
        seed = int(rng.integers(0, 2**31))
        kwargs: dict[str, Any] = dict(
            max_frames=max_frames,
            num_buckets=num_buckets,
            max_batch_size=max_batch_size,
            shuffle=shuffle,
            seed=seed,
        )
        kept = [i for i, x in enumerate(lengths) if x <= max_frames]
        try:
            per_rank = _all_ranks(lengths, world_size, int(rng.integers(0, 100)), **kwargs)
        except ValueError:
            # Legitimate only when nothing fits or the ranks cannot get equal step counts.
            assert len(kept) == 0 or world_size > 1
            continue
        for batches in per_rank:
            assert len(batches) == len(per_rank[0])
            for batch in batches:
                assert batch, "empty batch"
                assert _padded(batch, lengths) <= max_frames
                if max_batch_size is not None:
                    assert len(batch) <= max_batch_size
                assert all(isinstance(i, int) for i in batch)
        assert sorted(i for batches in per_rank for b in batches for i in b) == kept


def test_batches_stay_within_one_duration_bucket() -> None:
    lengths = _random_lengths(np.random.default_rng(7), 1000)
    num_buckets = 10
    order = np.argsort(np.asarray(lengths), kind="stable")
    bucket_of = np.empty(len(lengths), dtype=int)
    for b, members in enumerate(np.array_split(order, num_buckets)):
        bucket_of[members] = b
    s = BucketingBatchSampler(lengths, max_frames=10_000, num_buckets=num_buckets, seed=3)
    for batch in s:
        assert len({int(bucket_of[i]) for i in batch}) == 1


def test_padding_is_small_with_bucketing() -> None:
    # Sanity check on the point of bucketing: most padded frames are real frames.
    lengths = _random_lengths(np.random.default_rng(8), 5000)
    s = BucketingBatchSampler(lengths, max_frames=20_000)
    real = sum(lengths)
    padded = sum(_padded(b, lengths) for b in s)
    assert real / padded > 0.8


# -------------------------------------------------------------------------------- exclusions


def test_too_long_utterances_are_excluded_and_reported(caplog: pytest.LogCaptureFixture) -> None:
    lengths = [100, 5000, 200, 1001, 1000, 300]
    with caplog.at_level(logging.WARNING, logger="asr.data.sampler"):
        s = BucketingBatchSampler(lengths, max_frames=1000)
    assert s.excluded == [1, 3]
    assert "2 of 6 utterances" in caplog.text
    yielded = sorted(i for b in s for i in b)
    assert yielded == [0, 2, 4, 5]


def test_no_warning_when_nothing_excluded(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="asr.data.sampler"):
        s = BucketingBatchSampler([10, 20, 30], max_frames=1000)
    assert s.excluded == []
    assert caplog.text == ""


def test_all_excluded_raises() -> None:
    with pytest.raises(ValueError, match="nothing to batch"):
        BucketingBatchSampler([500, 600], max_frames=100)


# ------------------------------------------------------------------------------ determinism


def test_same_seed_and_epoch_same_order_other_epoch_or_seed_differs() -> None:
    lengths = _random_lengths(np.random.default_rng(2), 3000)
    a = BucketingBatchSampler(lengths, max_frames=6000, seed=11)
    b = BucketingBatchSampler(lengths, max_frames=6000, seed=11)
    a.set_epoch(3)
    b.set_epoch(3)
    assert list(a) == list(b)
    assert list(a) == list(a)  # iterating twice gives the same epoch again
    other_epoch = a.batches_for_epoch(4)
    assert other_epoch != list(a)
    c = BucketingBatchSampler(lengths, max_frames=6000, seed=12)
    c.set_epoch(3)
    assert list(c) != list(a)


def test_order_is_independent_of_history() -> None:
    # Epoch 5's order must not depend on which epochs were computed before (pure function).
    lengths = _random_lengths(np.random.default_rng(3), 500)
    fresh = BucketingBatchSampler(lengths, max_frames=4000, seed=5, rank=1, world_size=2)
    used = BucketingBatchSampler(lengths, max_frames=4000, seed=5, rank=1, world_size=2)
    for epoch in range(5):
        used.set_epoch(epoch)
        list(used)
    assert fresh.batches_for_epoch(5) == used.batches_for_epoch(5)


def test_no_shuffle_is_sorted_and_deterministic() -> None:
    rng = np.random.default_rng(4)
    lengths = rng.integers(50, 400, size=1500).tolist()  # many ties
    s = BucketingBatchSampler(lengths, max_frames=3000, shuffle=False, seed=9)
    flat = [i for b in s for i in b]
    # Sorted by length, ties by index: exactly a stable sort.
    assert flat == sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    for epoch in (1, 7):
        s.set_epoch(epoch)
        assert [i for b in s for i in b] == flat
    other = BucketingBatchSampler(lengths, max_frames=3000, shuffle=False, seed=123)
    assert [i for b in other for i in b] == flat


def test_no_shuffle_ranks_each_sorted() -> None:
    lengths = _random_lengths(np.random.default_rng(5), 999)
    for batches in _all_ranks(lengths, 3, max_frames=5000, shuffle=False):
        flat = [lengths[i] for b in batches for i in b]
        assert flat == sorted(flat)


# ------------------------------------------------------------------------------------ resume


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_resume_mid_epoch_yields_the_tail(world_size: int) -> None:
    lengths = _random_lengths(np.random.default_rng(6), 1200)
    for rank in range(world_size):
        full = BucketingBatchSampler(
            lengths, max_frames=5000, seed=21, rank=rank, world_size=world_size
        )
        full.set_epoch(2)
        order = list(full)
        for k in (0, 1, 5, len(order) - 1, len(order)):
            resumed = BucketingBatchSampler(
                lengths, max_frames=5000, seed=21, rank=rank, world_size=world_size
            )
            resumed.set_epoch(2, start_batch=k)
            assert len(resumed) == len(order) - k
            assert list(resumed) == order[k:]


def test_resume_through_state_dict_on_a_fresh_instance() -> None:
    lengths = _random_lengths(np.random.default_rng(7), 1500)
    world_size = 2
    samplers = [
        BucketingBatchSampler(lengths, max_frames=5000, seed=8, rank=r, world_size=world_size)
        for r in range(world_size)
    ]
    for s in samplers:
        s.set_epoch(3)
    uninterrupted = [list(s) for s in samplers]

    # Train 7 steps, checkpoint (one copy, from rank 0, as a trainer would), "crash".
    batches_done = 7
    states = [s.state_dict(batches_done) for s in samplers]
    assert states[0] == states[1], "state must be rank-independent"
    state = states[0]
    assert set(state) == {"seed", "epoch", "start_batch", "fingerprint"}
    assert (state["seed"], state["epoch"], state["start_batch"]) == (8, 3, 7)

    # Restart: fresh instances with a different constructor seed; the state restores it.
    for rank in range(world_size):
        fresh = BucketingBatchSampler(
            lengths, max_frames=5000, seed=0, rank=rank, world_size=world_size
        )
        fresh.load_state_dict(state)
        assert (fresh.seed, fresh.epoch, fresh.start_batch) == (8, 3, 7)
        assert list(fresh) == uninterrupted[rank][batches_done:]

        # A second interruption within the resumed epoch: batches_done counts from the
        # start of the epoch, so it composes.
        again = BucketingBatchSampler(lengths, max_frames=5000, rank=rank, world_size=world_size)
        again.load_state_dict(fresh.state_dict(batches_done + 4))
        assert list(again) == uninterrupted[rank][batches_done + 4 :]
        # The next epoch after resuming is the normal next epoch.
        again.set_epoch(4)
        assert list(again) == samplers[rank].batches_for_epoch(4)


def test_state_dict_is_plain_python() -> None:
    # numpy lengths (as loaded from a manifest array) must not leak numpy scalars into the state.
    s = BucketingBatchSampler(np.array([10, 20, 30, 40]), max_frames=60, seed=3)
    state = s.state_dict(1)
    assert all(type(v) in (int, str) for v in state.values())


@pytest.mark.parametrize(
    "change",
    [
        {"num_frames": [100] * 200 + [101]},
        {"max_frames": 1999},
        {"world_size": 1},
        {"num_buckets": 5},
        {"max_batch_size": 8},
        {"shuffle": False},
    ],
)
def test_fingerprint_mismatch_raises(change: dict[str, Any]) -> None:
    base: dict[str, Any] = dict(num_frames=[100] * 201, max_frames=2000, world_size=2)
    state = BucketingBatchSampler(**base).state_dict(2)
    changed = BucketingBatchSampler(**{**base, **change})
    with pytest.raises(ValueError, match="cannot be resumed exactly"):
        changed.load_state_dict(state)
    # The same config (other rank, other seed) accepts it.
    BucketingBatchSampler(**{**base, "rank": 1, "seed": 99}).load_state_dict(state)


def test_load_state_dict_validates() -> None:
    s = BucketingBatchSampler([100] * 50, max_frames=1000)
    state = s.state_dict(0)
    with pytest.raises(ValueError, match="missing keys"):
        s.load_state_dict({"seed": 0, "epoch": 0})
    with pytest.raises(ValueError, match="start_batch"):
        s.load_state_dict({**state, "start_batch": 10_000})
    assert s.seed == 0 and s.start_batch == 0  # a failed load leaves the state alone


def test_start_batch_and_batches_done_bounds() -> None:
    s = BucketingBatchSampler([100] * 50, max_frames=1000, num_buckets=1)  # 5 batches of 10
    assert len(s) == 5
    s.set_epoch(1, start_batch=5)
    assert len(s) == 0 and list(s) == []
    assert s.state_dict(5)["start_batch"] == 5
    with pytest.raises(ValueError, match="exceeds"):
        s.set_epoch(1, start_batch=6)
    with pytest.raises(ValueError, match="exceeds"):
        s.state_dict(6)
    with pytest.raises(ValueError, match="batches_done"):
        s.state_dict(-1)


# --------------------------------------------------------------------------- argument checks


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"max_frames": 0}, "max_frames"),
        ({"max_frames": -5}, "max_frames"),
        ({"max_frames": 100.0}, "max_frames"),
        ({"max_frames": True}, "max_frames"),
        ({"num_buckets": 0}, "num_buckets"),
        ({"max_batch_size": 0}, "max_batch_size"),
        ({"seed": -1}, "seed"),
        ({"world_size": 0}, "world_size"),
        ({"rank": 2, "world_size": 2}, "rank"),
        ({"rank": -1, "world_size": 2}, "rank"),
        ({"num_frames": []}, "empty"),
        ({"num_frames": [10, 0, 20]}, r"num_frames\[1\]"),
        ({"num_frames": [10, -3]}, r"num_frames\[1\]"),
        ({"num_frames": [10.5, 20.0]}, "integers"),
        ({"num_frames": [[1, 2], [3, 4]]}, "1-D"),
    ],
)
def test_bad_arguments_raise(kwargs: dict[str, Any], match: str) -> None:
    args: dict[str, Any] = {"num_frames": [10, 20, 30], "max_frames": 100, **kwargs}
    with pytest.raises(ValueError, match=match):
        BucketingBatchSampler(**args)


def test_bad_epoch_raises() -> None:
    s = BucketingBatchSampler([10, 20, 30], max_frames=100)
    with pytest.raises(ValueError, match="epoch"):
        s.set_epoch(-1)
    with pytest.raises(ValueError, match="start_batch"):
        s.set_epoch(0, start_batch=-1)


# ----------------------------------------------------------------------- DataLoader and speed


class _IndexDataset(torch.utils.data.Dataset[int]):
    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> int:
        return i


def test_works_as_dataloader_batch_sampler() -> None:
    lengths = _random_lengths(np.random.default_rng(9), 300)
    s = BucketingBatchSampler(lengths, max_frames=4000, seed=1)
    loader = torch.utils.data.DataLoader(
        _IndexDataset(len(lengths)), batch_sampler=s, collate_fn=list
    )
    assert len(loader) == len(s)
    assert list(loader) == list(s)
    s.set_epoch(1, start_batch=3)
    assert len(loader) == len(s)
    assert list(loader) == s.batches_for_epoch(1)[3:]


def test_300k_utterances_fast_enough() -> None:
    # LibriSpeech 960 h has ~281k utterances. Sanity bound, not a benchmark.
    lengths = np.random.default_rng(10).integers(80, 3600, size=300_000)
    start = time.perf_counter()
    s = BucketingBatchSampler(lengths.tolist(), max_frames=20_000, rank=1, world_size=8)
    for epoch in range(2):
        s.set_epoch(epoch)
        n = sum(len(b) for b in s)
    elapsed = time.perf_counter() - start
    assert n > 30_000
    assert elapsed < 10.0, f"{elapsed:.1f} s for 300k utterances"
