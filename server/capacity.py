"""How many concurrent streams a server admits by default: measured at start-up.

A fixed `--max-streams` is wrong on every machine but one: too high and, past capacity, every
stream falls behind real time together (latency grows without bound while the server
accepts more); too low and cores sit idle. So, unless `--max-streams` is given, the server
measures its engine once its workers have started, before it listens:

- Time. `PROBE_STREAMS` streams per worker of the default streaming model, at its default
  options, each fed `PROBE_SECONDS` of speech-like audio (noise amplitude-modulated at a
  syllable rate: the model hears words in it, so the search and partial results do their usual
  work; white noise or silence come out mostly blank and leave them idle) in 100 ms chunks as
  fast as the engine takes them, every worker at once. `realtime` = audio seconds served per
  wall second: how many real-time streams the workers could carry flat out, the process
  boundary and the batching included. gRPC's own work (the server process parsing and
  answering each chunk) is not in it, and latency grows well before the cores are full, so the
  default admits `HEADROOM` of it. `bench/server_load.py` checks the choice: on an idle 2-core
  AMD EPYC (2026-12-04), `make demo`'s model at 6 + 4 frame blocks, two workers, the probe
  measured 98-105 real-time streams in three runs (one worker: 54), so the default is about
  40; the bench's server kept real time at 64 streams, not at 96, and met both latency targets
  up to 32 (48: final p95 228 ms, first partial p95 532 ms).
- Memory. A stream's own state (`StreamingSession.state_bytes`: its segment's features,
  log-probs and back-pointers) grows with its segment up to `EndpointConfig.max_segment`;
  measured on one local stream and extrapolated to a whole segment, it bounds the streams that
  fit in `MEMORY_SHARE` of the memory available now.

The default limit is the smaller, and at least one stream per worker.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from asr.recognizer import Recognizer
from asr.streaming import EndpointConfig, StreamingSession
from server.engine import Engine

log = logging.getLogger("asr.server")

PROBE_STREAMS = 32  # per worker: enough for the batched path, not so many that start-up drags
PROBE_SECONDS = 2.0  # audio per probe stream
CHUNK_SECONDS = 0.1
HEADROOM = 0.4  # share of the flat-out throughput admitted (module docstring)
MEMORY_SHARE = 0.5  # of the memory available at start-up, for stream state
SAMPLE_RATE = 16000


@dataclass(frozen=True)
class Capacity:
    """What the start-up probe measured, and the stream limit it gives."""

    streams: int  # the default --max-streams
    realtime: float  # real-time streams the engine carried flat out
    stream_bytes: int  # one stream's own state at a whole --max-segment segment
    memory_streams: int  # streams whose state fits in MEMORY_SHARE of available memory
    probe_streams: int
    probe_wall: float  # seconds the timed probe took

    def describe(self) -> str:
        return (
            f"{self.streams} concurrent streams (measured: {self.probe_streams} streams flat "
            f"out carried {self.realtime:.0f} real-time in {self.probe_wall:.1f} s, "
            f"{HEADROOM:.0%} of it admitted; {self.stream_bytes / 2**20:.1f} MiB per stream "
            f"at a whole segment, {self.memory_streams} fit in memory)"
        )


def speechlike(seconds: float, seed: int) -> torch.Tensor:
    """(N,) 16 kHz noise amplitude-modulated at 4 Hz, about a syllable rate: a CTC model
    hears tokens in it (white noise it mostly calls blank)."""
    n = int(seconds * SAMPLE_RATE)
    noise = torch.randn(n, generator=torch.Generator().manual_seed(seed))
    t = torch.arange(n) / SAMPLE_RATE
    envelope = (0.5 + 0.5 * torch.sin(2 * math.pi * 4 * t + seed)).clamp(min=0)
    return 0.1 * noise * envelope


async def measure(
    engine: Engine, model: str, recognizer: Recognizer, endpoint: EndpointConfig
) -> Capacity:
    """Probe `engine` with streams of `model` (its default options) and size the limit."""
    workers = sum(1 for w in engine.workers if w.alive)
    count = PROBE_STREAMS * workers
    options = recognizer.options
    chunk = int(CHUNK_SECONDS * SAMPLE_RATE)
    audio = [speechlike(PROBE_SECONDS, seed) for seed in range(count)]

    async def one(samples: torch.Tensor) -> None:
        with engine.open_stream(model, options, endpoint, True) as stream:
            for start in range(0, samples.numel() - chunk, chunk):
                await stream.accept(samples[start : start + chunk])
            await stream.finish(samples[samples.numel() - chunk :])

    # Warm-up, a stream on each worker: first calls allocate and build caches.
    await asyncio.gather(*(one(a[: 4 * chunk]) for a in audio[:workers]))
    began = time.perf_counter()
    await asyncio.gather(*(one(a) for a in audio))
    wall = time.perf_counter() - began
    realtime = count * PROBE_SECONDS / wall
    stream_bytes = segment_bytes(recognizer, endpoint)
    memory_streams = int(MEMORY_SHARE * available_memory() / max(stream_bytes, 1))
    streams = max(workers, min(int(HEADROOM * realtime), memory_streams))
    return Capacity(streams, realtime, stream_bytes, memory_streams, count, wall)


def segment_bytes(recognizer: Recognizer, endpoint: EndpointConfig) -> int:
    """One stream's own state at a whole `max_segment` segment: measured on a local stream
    at two points of one unbroken segment and extrapolated (it grows linearly: per frame of
    the segment its features, log-probs and back-pointers)."""
    unbroken = EndpointConfig(trailing_silence=1e9, max_segment=1e9)
    session = StreamingSession(recognizer, endpoint=unbroken, interim_results=False)
    chunk = int(CHUNK_SECONDS * SAMPLE_RATE)
    audio = speechlike(2.0, seed=0)
    sizes = []
    for half in (audio[: audio.numel() // 2], audio[audio.numel() // 2 :]):
        for start in range(0, half.numel(), chunk):
            session.accept(half[start : start + chunk])
        sizes.append(session.state_bytes())
    per_second = max(sizes[1] - sizes[0], 0) / 1.0
    return int(sizes[1] + per_second * max(endpoint.max_segment - 2.0, 0.0))


def available_memory() -> int:
    """Bytes available to new allocations: Linux MemAvailable, narrowed by a cgroup v2 or v1
    memory limit (containers) less what the group uses; else the physical memory."""
    found = [os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")]
    for line in _read("/proc/meminfo").splitlines():
        if line.startswith("MemAvailable:"):
            found.append(int(line.split()[1]) * 1024)
    for limit, usage in (
        ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
        (
            "/sys/fs/cgroup/memory/memory.limit_in_bytes",
            "/sys/fs/cgroup/memory/memory.usage_in_bytes",
        ),
    ):
        cap, used = _read(limit).strip(), _read(usage).strip()
        if cap.isdigit():  # "max": no limit
            found.append(max(int(cap) - (int(used) if used.isdigit() else 0), 0))
    return min(found)


def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""
