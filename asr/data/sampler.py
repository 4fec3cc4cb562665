"""Duration-bucketing batch sampler with a padded-frame budget, DDP sharding and exact resume.

Speech utterances vary from ~1 s to ~35 s (100 to 3500 feature frames at a 10 ms hop), so a
fixed batch size either wastes most of a batch on padding or runs out of memory on the long
tail. :class:`BucketingBatchSampler` instead gives every batch a budget of *padded* frames —
``len(batch) * max(num_frames[i] for i in batch)``, which is what the padded ``(B, T, F)``
tensor (and the activation memory of the encoder) actually costs — and groups utterances of
similar duration so little of that budget goes to padding.

Use it as ``DataLoader(dataset, batch_sampler=sampler, collate_fn=...)``.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
import torch.utils.data

__all__ = ["BucketingBatchSampler"]

logger = logging.getLogger(__name__)

# Bumped if the batching algorithm changes in a way that alters the order for the same inputs,
# so that a checkpoint from an older version refuses to "resume" into a different order.
_ALGORITHM_VERSION = 1


class BucketingBatchSampler(torch.utils.data.Sampler[list[int]]):
    """Yield lists of dataset indices whose padded size fits a frame budget.

    Args:
        num_frames: feature frames of each utterance (a sequence or 1-D integer array);
            ``num_frames[i]`` belongs to dataset index ``i``. Every entry must be >= 1.
        max_frames: budget per batch in *padded* frames: for every batch,
            ``len(batch) * max(num_frames[i] for i in batch) <= max_frames``. E.g. 20_000 frames
            at a 10 ms hop is 200 s of padded audio per batch (per rank).
        num_buckets: number of duration buckets. Utterances are sorted by length and cut into
            this many buckets holding (nearly) equal numbers of utterances (quantiles); batches
            never mix buckets. More buckets -> less padding but less randomness in which
            utterances meet in a batch. Each bucket ends in one partly filled batch, so keep
            ``num_buckets`` well below the number of batches per epoch.
        max_batch_size: optional cap on utterances per batch (short utterances could otherwise
            form huge batches, e.g. for per-utterance overheads such as attention decoders).
        shuffle: if True, shuffle utterances within each bucket and shuffle the order of the
            batches, deterministically from ``(seed, epoch)``. If False, the epoch is in a
            stable sorted order: shortest utterances first, ties broken by index.
        seed: non-negative base seed; the same on every rank.
        rank: this process's rank in ``[0, world_size)``.
        world_size: number of data-parallel ranks. Every rank computes the same global batch
            list and takes batches ``rank, rank + world_size, ...``.

    Exclusions: an utterance with ``num_frames[i] > max_frames`` cannot form even a batch of
    one, so it is never yielded. Such indices are listed in :attr:`excluded` (and counted in a
    logged warning) so the caller can report or filter them; they are not dropped silently.

    Ordering and DDP: the batches of an epoch are a pure function of ``(seed, epoch, num_frames,
    max_frames, num_buckets, max_batch_size, shuffle, world_size)``. Across all ranks, every
    non-excluded utterance appears exactly once per epoch, and every rank yields the same number
    of batches (DDP needs equal step counts): if the global batch count is not divisible by
    ``world_size``, the batches with the most utterances are split in two until it is. If that
    is impossible (too few utterances to give every rank a batch at each step) the constructor
    raises ``ValueError`` (checked on epoch 0; in degenerate configs where nearly every batch
    holds a single utterance, a later epoch's :meth:`set_epoch` can raise it too).

    Resuming mid-epoch: the sampler cannot know how many batches the training loop consumed,
    because the DataLoader prefetches ahead of the model. So the trainer, which counts the steps
    it finished, passes that count in:

    .. code-block:: python

        sampler = BucketingBatchSampler(frames, max_frames=20_000, rank=r, world_size=w)
        if ckpt is not None:
            sampler.load_state_dict(ckpt["sampler"])      # restores seed, epoch, start_batch
        for epoch in range(sampler.epoch, num_epochs):
            if epoch != sampler.epoch:
                sampler.set_epoch(epoch)                   # start_batch=0 for a fresh epoch
            # batches_done counts this rank's batches of the epoch, including skipped ones.
            for batches_done, batch in enumerate(loader, start=sampler.start_batch + 1):
                train_step(batch)
                if time_to_checkpoint:
                    save({"sampler": sampler.state_dict(batches_done), ...})

    Equivalently, without state dicts: ``set_epoch(epoch, start_batch=batches_done)`` yields
    exactly the remaining batches of the uninterrupted order of that epoch. The skip applies
    to every iteration until the next :meth:`set_epoch`.
    """

    def __init__(
        self,
        num_frames: Sequence[int] | npt.NDArray[np.integer],
        max_frames: int,
        num_buckets: int = 20,
        max_batch_size: int | None = None,
        shuffle: bool = True,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        super().__init__()
        max_frames = _as_int("max_frames", max_frames, minimum=1)
        num_buckets = _as_int("num_buckets", num_buckets, minimum=1)
        if max_batch_size is not None:
            max_batch_size = _as_int("max_batch_size", max_batch_size, minimum=1)
        seed = _as_int("seed", seed, minimum=0)
        world_size = _as_int("world_size", world_size, minimum=1)
        rank = _as_int("rank", rank, minimum=0)
        if rank >= world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        lengths = _as_lengths(num_frames)

        self.max_frames = max_frames
        self.num_buckets = num_buckets
        self.max_batch_size = max_batch_size
        self.shuffle = bool(shuffle)
        self.rank = rank
        self.world_size = world_size
        self._lengths = lengths

        too_long = lengths > max_frames
        # Public, plain Python ints: callers log or filter the manifest with them.
        self.excluded: list[int] = np.flatnonzero(too_long).tolist()
        if self.excluded:
            logger.warning(
                "%d of %d utterances are longer than max_frames=%d on their own and are "
                "excluded from batching (indices in BucketingBatchSampler.excluded; "
                "longest: %d frames)",
                len(self.excluded),
                len(lengths),
                max_frames,
                int(lengths[too_long].max()),
            )
        kept = np.flatnonzero(~too_long)
        if kept.size == 0:
            raise ValueError(
                f"all {len(lengths)} utterances exceed max_frames={max_frames}; nothing to batch"
            )
        # Sorting and bucketing do not depend on the epoch, so do them once. A stable sort makes
        # ties deterministic (by index), which the shuffle=False order and resume rely on.
        by_length = kept[np.argsort(lengths[kept], kind="stable")]
        # Quantile buckets: equal utterance counts, so the buckets of the long tail are narrow
        # in duration where padding would hurt most. Never more buckets than utterances, so
        # no bucket is empty.
        self._buckets: list[np.ndarray] = [
            b for b in np.array_split(by_length, min(num_buckets, by_length.size)) if b.size
        ]
        self._fingerprint = self._compute_fingerprint()

        self._seed = seed
        self._epoch = 0
        self._start_batch = 0
        self._cache_key: tuple[int, int] | None = None
        self._cache: list[list[int]] = []
        # Fail at construction, not at the first step of training, if the ranks cannot be
        # given equal step counts. (Later epochs can still fail only in degenerate configs
        # where nearly every batch is a single utterance; see _make_divisible.)
        self._global_batches(0)

    # ------------------------------------------------------------------ state

    @property
    def seed(self) -> int:
        """Base seed (restored by :meth:`load_state_dict`)."""
        return self._seed

    @property
    def epoch(self) -> int:
        """Epoch whose order :meth:`__iter__` yields."""
        return self._epoch

    @property
    def start_batch(self) -> int:
        """Number of this rank's batches of the current epoch skipped by :meth:`__iter__`."""
        return self._start_batch

    @property
    def fingerprint(self) -> str:
        """Hash of everything besides ``(seed, epoch)`` that determines the order."""
        return self._fingerprint

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Select the epoch to iterate and how many of this rank's batches to skip.

        Args:
            epoch: epoch number (>= 0); each epoch has its own order.
            start_batch: number of this rank's batches of ``epoch`` already trained on; the
                iteration resumes with batch ``start_batch`` (0-based) of the uninterrupted
                order. Must be at most the number of batches this rank has in the epoch.
        """
        epoch = _as_int("epoch", epoch, minimum=0)
        start_batch = _as_int("start_batch", start_batch, minimum=0)
        total = len(self._global_batches(epoch)) // self.world_size
        if start_batch > total:
            raise ValueError(
                f"start_batch={start_batch} exceeds the {total} batches rank {self.rank} has "
                f"in epoch {epoch}"
            )
        self._epoch = epoch
        self._start_batch = start_batch

    def state_dict(self, batches_done: int) -> dict[str, Any]:
        """Return the state needed to resume exactly after ``batches_done`` batches.

        Args:
            batches_done: how many of this rank's batches of the current epoch the trainer has
                finished, counted from the start of the epoch (so including the ``start_batch``
                skipped when resuming). Every rank runs the same number of steps, so the dict
                is the same on every rank and one copy (e.g. rank 0's) can restore all ranks.

        Returns:
            ``{"seed", "epoch", "start_batch", "fingerprint"}``; plain Python types, safe to
            put in a ``torch.save`` checkpoint or JSON.
        """
        batches_done = _as_int("batches_done", batches_done, minimum=0)
        total = len(self._global_batches(self._epoch)) // self.world_size
        if batches_done > total:
            raise ValueError(
                f"batches_done={batches_done} exceeds the {total} batches rank {self.rank} "
                f"has in epoch {self._epoch}"
            )
        return {
            "seed": self._seed,
            "epoch": self._epoch,
            "start_batch": batches_done,
            "fingerprint": self._fingerprint,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore ``seed``, ``epoch`` and ``start_batch`` from :meth:`state_dict`'s output.

        Raises:
            ValueError: if keys are missing, or the fingerprint differs: the lengths, budget,
                bucketing, shuffle flag or world size changed, so the saved position does not
                refer to the same order and an exact resume is impossible. (Start a fresh
                epoch instead, deliberately.)
        """
        missing = {"seed", "epoch", "start_batch", "fingerprint"} - set(state)
        if missing:
            raise ValueError(f"sampler state is missing keys {sorted(missing)}")
        if state["fingerprint"] != self._fingerprint:
            raise ValueError(
                "sampler state was saved for different data or batching config (num_frames, "
                "max_frames, num_buckets, max_batch_size, shuffle or world_size changed): "
                "the saved position cannot be resumed exactly"
            )
        seed = _as_int("seed", state["seed"], minimum=0)
        old_seed = self._seed
        self._seed = seed
        try:
            self.set_epoch(state["epoch"], start_batch=state["start_batch"])
        except ValueError:
            self._seed = old_seed
            raise

    # --------------------------------------------------------------- batching

    def batches_for_epoch(self, epoch: int) -> list[list[int]]:
        """This rank's complete batch list for ``epoch`` (ignores ``start_batch``)."""
        epoch = _as_int("epoch", epoch, minimum=0)
        return [list(b) for b in self._global_batches(epoch)[self.rank :: self.world_size]]

    def __iter__(self) -> Iterator[list[int]]:
        batches = self._global_batches(self._epoch)
        first = self.rank + self._start_batch * self.world_size
        for batch in batches[first :: self.world_size]:
            # Copy: the cached lists must not be mutated by a consumer.
            yield list(batch)

    def __len__(self) -> int:
        """Batches this rank yields for the current epoch, after skipping ``start_batch``."""
        return len(self._global_batches(self._epoch)) // self.world_size - self._start_batch

    def _global_batches(self, epoch: int) -> list[list[int]]:
        """All ranks' batches of ``epoch``, in order; cached for the latest (seed, epoch)."""
        key = (self._seed, epoch)
        if self._cache_key != key:
            self._cache = self._build(epoch)
            self._cache_key = key
        return self._cache

    def _build(self, epoch: int) -> list[list[int]]:
        # One generator seeded from (seed, epoch) drives every random choice of the epoch, so
        # the order is reproducible on every rank and after a restart. SeedSequence mixes the
        # pair properly (seed=1, epoch=0 and seed=0, epoch=1 give unrelated streams).
        rng = np.random.default_rng([self._seed, epoch])
        lengths = self._lengths
        budget = self.max_frames
        cap = self.max_batch_size if self.max_batch_size is not None else len(lengths)

        batches: list[list[int]] = []
        for bucket in self._buckets:
            order = rng.permutation(bucket) if self.shuffle else bucket
            # Greedy fill in (shuffled) order: close the batch as soon as the next utterance
            # would push the padded size over the budget. Python ints and lists: this loop is
            # the hot path (~0.1 s for 300k utterances), and numpy scalars are slower here.
            idx_list: list[int] = order.tolist()
            len_list: list[int] = lengths[order].tolist()
            batch: list[int] = []
            longest = 0
            for i, n in zip(idx_list, len_list, strict=True):
                new_longest = n if n > longest else longest
                if batch and (len(batch) >= cap or (len(batch) + 1) * new_longest > budget):
                    batches.append(batch)
                    batch, new_longest = [], n
                batch.append(i)
                longest = new_longest
            if batch:
                batches.append(batch)

        # Balance before shuffling the batch order: split in place, so with shuffle=False the
        # concatenated order stays sorted.
        self._make_divisible(batches)
        if self.shuffle:
            perm = rng.permutation(len(batches)).tolist()
            batches = [batches[p] for p in perm]
        return batches

    def _make_divisible(self, batches: list[list[int]]) -> None:
        """Split the largest batches in two until ``len(batches) % world_size == 0``.

        A half of a batch has fewer utterances and no longer maximum, so it stays within the
        budget; every utterance stays in exactly one batch. At most ``world_size - 1`` splits.
        """
        world = self.world_size
        needed = -len(batches) % world
        if needed == 0:
            return
        num_utts = sum(len(b) for b in batches)
        if num_utts < world:
            raise ValueError(
                f"only {num_utts} batchable utterances for world_size={world} ranks: every rank "
                f"needs at least one batch per step and each utterance may be used only once "
                f"per epoch. Use fewer ranks or more data."
            )
        # Each split adds one batch and a batch of one cannot be split, so the most batches we
        # can reach is one per utterance.
        if len(batches) + needed > num_utts:
            raise ValueError(
                f"cannot give each of world_size={world} ranks the same number of batches: "
                f"{num_utts} batchable utterances form {len(batches)} batches, and splitting "
                f"batches can reach at most {num_utts} batches, never a multiple of {world} "
                f"(need {len(batches) + needed}). Use fewer ranks or more data."
            )
        for _ in range(needed):
            # First batch with the most utterances: deterministic tie-break by position.
            j = max(range(len(batches)), key=lambda k: len(batches[k]))
            big = batches[j]
            half = (len(big) + 1) // 2
            batches[j : j + 1] = [big[:half], big[half:]]

    def _compute_fingerprint(self) -> str:
        # Everything except (seed, epoch, rank) that determines the global order. Rank is left
        # out on purpose: all ranks share one order, so rank 0's checkpoint restores any rank.
        h = hashlib.sha256()
        h.update(self._lengths.astype("<i8").tobytes())
        config = {
            "version": _ALGORITHM_VERSION,
            "num_utterances": len(self._lengths),
            "max_frames": self.max_frames,
            "num_buckets": self.num_buckets,
            "max_batch_size": self.max_batch_size,
            "shuffle": self.shuffle,
            "world_size": self.world_size,
        }
        h.update(json.dumps(config, sort_keys=True).encode())
        return h.hexdigest()

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(utterances={len(self._lengths)}, "
            f"excluded={len(self.excluded)}, max_frames={self.max_frames}, "
            f"num_buckets={self.num_buckets}, max_batch_size={self.max_batch_size}, "
            f"shuffle={self.shuffle}, seed={self._seed}, rank={self.rank}, "
            f"world_size={self.world_size}, epoch={self._epoch}, "
            f"start_batch={self._start_batch})"
        )


def _as_int(name: str, value: object, *, minimum: int) -> int:
    """Return ``value`` as a Python int, or raise ``ValueError`` naming the argument."""
    # bool is an int subclass; True as a budget or rank is always a mistake. numpy integers are
    # accepted (lengths often come from arrays) but stored as int so state dicts stay plain.
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an int, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def _as_lengths(num_frames: Sequence[int] | npt.NDArray[np.integer]) -> npt.NDArray[np.int64]:
    """Validate ``num_frames`` and return it as a 1-D int64 array."""
    if len(num_frames) == 0:
        raise ValueError("num_frames is empty: nothing to batch")
    arr = np.asarray(num_frames)
    if arr.ndim != 1:
        raise ValueError(f"num_frames must be 1-D (one length per utterance), got {arr.shape}")
    if arr.dtype.kind not in "iu":
        raise ValueError(f"num_frames must hold integers, got dtype {arr.dtype}")
    arr = arr.astype(np.int64)
    bad = np.flatnonzero(arr < 1)
    if bad.size:
        i = int(bad[0])
        raise ValueError(
            f"num_frames[{i}] = {int(arr[i])}: every utterance needs at least one frame "
            f"({bad.size} such entries; filter empty utterances out of the manifest)"
        )
    return arr
