"""Load test of `asr serve` from a separate process: concurrent real-time streams, the largest
number that stays real time, the server's CPU real-time factor, the unary micro-batching gain,
and pocketsphinx (CMU, C) decoding the same audio in the same run as the peer.

    python bench/server_load.py --model BUNDLE [--manifest M.jsonl] [--streams 8,16,32,...]
        [--per-stream-streams 2,4,8,...] [--duration 60] [--server-threads 1] [--workers N]
        [--chunk-size 8 --right-context 4] [--port 0] [--quantize int8] [--quick]

BUNDLE is a streaming (latency-controlled) BiLSTM-CTC bundle, e.g. the synthetic recipe's
exp/ctc/bundle; the manifest defaults to its held-out sentences. The benchmark starts
`asr serve --model ctc=BUNDLE` as a subprocess (stdout and stderr to temporary files; stderr
is printed if it fails to start, and the benchmark exits non-zero), waits for grpc.health.v1
SERVING, drives it with grpc.aio clients from this process (one event loop, so the load
generator stays light next to the server; its CPU share is printed) and always stops it
(SIGTERM, then SIGKILL). Run it on an otherwise idle machine: client and server share the cores.

Streaming: one level per N in --streams, in order, stopping after the first that is not real
time. N streams, each a loop of StreamingRecognize calls, one call per held-out utterance
(streams start at different utterances, spread over one chunk period): the call sends the
config (LINEAR16, 16 kHz, interim results on), then digital silence (uniform from --gap to
--gap plus one encoder block, so speech starts at every phase of the model's blocks, as in a
live stream) and the utterance, in 100 ms chunks, each sent once its audio would have been
spoken (real-time pace, as `asr client --realtime`), then half-closes and reads to the end.
A level lasts --duration seconds: calls still sending then are cancelled; the figures come
from the calls that finished (every stream was sending throughout their life).
Definitions (times on this process's monotonic clock):
  first partial latency: arrival of the call's first result with text (interim, or the final
    if none came before it) minus the moment the first chunk holding speech was sent (speech:
    the first 10 ms frame within 30 dB of the utterance's loudest frame).
  first word latency: the same for the first result whose first word is the call's final
    first word, complete (another word follows it, or the result is final): when a reader
    can first trust the first word (a first partial is often a word's first units).
  first partial wait: the part of that spent waiting for audio: from the speech chunk to the
    chunk completing the audio the first partial needs (the first word must be said, and the
    model emits blocks only after a right context); the rest is the server's.
  final latency: arrival of the call's last final result minus the moment its last audio chunk
    was sent (the half-close follows at once): the server's end-of-audio path (queued chunks,
    the encoder's flush of its look-ahead, the final beam search). Calls whose last final came
    before the end of the audio (an endpoint in trailing silence) are counted apart.
  interim delay (the server's processed-audio clock): for each interim result, its arrival
    minus the send time of the chunk that completed the audio it needs: its result_end_time
    plus the encoder's right context plus the feature window's overhang (the encoder emits a
    frame once it has that much audio after it). The server's processing and queueing time:
    small while it keeps up, growing as chunks queue.
  send lateness: how late this client sent chunks against the real-time schedule.
A level "stays real time" when no call failed, the client kept its schedule (send lateness
p95 <= 50 ms), and final latency p95 and interim delay p95 are both <= --lag-bound-ms (default
500 ms: under half a second of audio queued). The targets (>= 100 streams, final p95
<= 250 ms, first partial p95 <= 500 ms) are checked at the largest real-time N. Levels run
in the order given up to the first that falls behind; when the first already does, N halves
until one keeps up (so a gain is never taken over 0 streams).

Two servers run the same levels, one after the other: the batched one (server defaults:
stream chunks batched across streams, Recognize micro-batched; --streams) and a per-stream one
(--max-stream-batch 1 --stream-wait-ms 0 --max-batch 1: every chunk and call alone, as before
cross-stream batching; --per-stream-streams); stream_batching_gain = the largest real-time N
batched / per-stream. The machine line names the CPU, its vector instruction sets and torch's
MKL/oneDNN build, so that figures from different machines can be compared.
rtf: CPU seconds of the server and its worker processes (all threads, /proc/PID/stat) during
the level divided by the audio seconds sent in it: cores needed per real-time stream, gRPC
included.

Unary: --unary-utterances utterances (LINEAR16) sent through Recognize by --callers concurrent
callers, to the batched server (micro-batching on, at its default max batch and max wait) and
to the per-stream one (--max-batch 1); batching_gain = throughput (audio s per wall s)
batched over unbatched. The peer: pocketsphinx with its bundled US English model, decoding the
first --peer-utterances of the same utterances in 100 ms chunks on this thread before any
server starts; its RTF is that thread's CPU seconds over audio seconds, and vs_pocketsphinx =
rtf_pocketsphinx / rtf (how many times less CPU per audio second our server needs). WERs are
printed for context only: our model is trained in-domain (synthetic voices), pocketsphinx's
general model is not.

Each figure is printed with its target and whether it is met. Last line (machine-readable):
    server streams_realtime=<n> final_p95_ms=<a> first_partial_p95_ms=<b> rtf=<c>
        vs_pocketsphinx=<r>x batching_gain=<g>x stream_batching_gain=<s>x
        first_word_p95_ms=<w>   (one line)
with the latencies and rtf of the batched server's level n (of its first level, and n=0, if
none stayed real time).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import grpc
import numpy as np
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from asr import load_model
from asr.audio import SAMPLE_RATE, load_audio
from asr.client import to_seconds
from asr.data.manifest import read_manifest
from asr.metrics import error_rates
from asr.models.bilstm_ctc import BiLSTMCTC
from asr.quantize import QUANTIZATIONS
from asr.v1 import asr_pb2, asr_pb2_grpc

REPO = Path(__file__).resolve().parents[1]
Config = asr_pb2.RecognitionConfig
CHUNK_MS = 100
LATE_BOUND_MS = 50.0  # client send lateness p95 above this: the load generator fell behind
SPEECH_DB = 30.0  # a 10 ms frame within this many dB of the loudest one holds speech
TARGET_STREAMS = 100
TARGET_STREAM_BATCHING = 5.0  # real-time streams batched / per-stream
TARGET_VS_PEER = 10.0  # pocketsphinx CPU seconds per audio second / ours
# The per-stream server: each stream chunk and Recognize call runs alone.
PER_STREAM = ("--max-stream-batch", "1", "--stream-wait-ms", "0", "--max-batch", "1")
VECTOR_SETS = {"avx2": "AVX2", "avx512f": "AVX-512", "avx512_bf16": "AVX-512 BF16"}
VECTOR_SETS |= {"amx_tile": "AMX"}
BUILD_PATTERNS = (
    r"Intel\(R\) oneAPI Math Kernel Library Version [\d.]+",
    r"(?:oneDNN|MKL-DNN) v[\d.]+",
)
TARGET_FINAL_MS = 250.0
TARGET_PARTIAL_MS = 500.0
TARGET_BATCHING = 2.0


@dataclass(frozen=True)
class Audio:
    id: str
    text: str
    pcm: bytes  # 16 kHz mono PCM16, without the gap
    seconds: float
    speech_start: float  # seconds into the utterance


@dataclass
class Call:
    """One StreamingRecognize call: what was sent when, and what came back when."""

    utterance: int
    chunks: list[bytes]
    chunk_seconds: list[float]
    speech_chunk: int
    sent: list[float] = field(default_factory=list)  # send time of each chunk
    lateness: list[float] = field(default_factory=list)
    # (arrival, is_final, result_end_time, text)
    results: list[tuple[float, bool, float, str]] = field(default_factory=list)
    done: float = math.nan
    error: str | None = None

    def trigger(self, end: float, lookahead: float) -> float:
        """When the server first had all the audio that a result ending at `end` needs: the
        send time of the first chunk completing `end + lookahead` seconds of audio."""
        have = np.cumsum(self.chunk_seconds[: len(self.sent)])
        i = int(np.searchsorted(have, end + lookahead - 1e-6))
        return self.sent[min(i, len(self.sent) - 1)]

    def _first(self) -> tuple[float, bool, float, str] | None:
        """The first result with text, if the chunk with speech was sent."""
        if self.speech_chunk >= len(self.sent):
            return None
        return next((r for r in self.results if r[3]), None)

    def first_partial(self) -> float | None:
        first = self._first()
        return None if first is None else first[0] - self.sent[self.speech_chunk]

    def first_word(self) -> float | None:
        words = self.text().split()
        if not words or self._first() is None:  # no final text, or speech never sent
            return None
        arrival = next(
            r[0]
            for r in self.results
            if (said := r[3].split()) and said[0] == words[0] and (len(said) > 1 or r[1])
        )  # the final has it
        return arrival - self.sent[self.speech_chunk]

    def first_partial_wait(self, lookahead: float) -> float | None:
        """The part of the first partial's latency spent waiting for audio (the model's
        look-ahead and block size, and the time to say the first word), not on the server."""
        first = self._first()
        if first is None:
            return None
        return max(0.0, self.trigger(first[2], lookahead) - self.sent[self.speech_chunk])

    def final(self) -> float | None:
        finals = [r[0] for r in self.results if r[1]]
        if not finals or not self.sent or finals[-1] < self.sent[-1]:
            return None
        return finals[-1] - self.sent[-1]

    def interim_delays(self, lookahead: float) -> list[float]:
        return [
            arrival - self.trigger(end, lookahead)
            for arrival, final, end, _ in self.results
            if not final
        ]

    def text(self) -> str:
        return " ".join(r[3] for r in self.results if r[1] and r[3])


@dataclass
class Level:
    streams: int
    calls: list[Call]  # those that finished (the ones cut by the end of the level do not)
    failed: list[str]
    cpu_seconds: float
    audio_seconds: float
    wall_seconds: float
    client_cpu_seconds: float
    lookahead: float
    lag_bound: float
    memory_bytes: int = 0  # the server's peak PSS (with its worker processes) in the level

    def _values(self, name: str) -> list[float]:
        if name == "partial":
            return [v for c in self.calls if (v := c.first_partial()) is not None]
        if name == "final":
            return [v for c in self.calls if (v := c.final()) is not None]
        if name == "word":
            return [v for c in self.calls if (v := c.first_word()) is not None]
        if name == "delay":
            return [d for c in self.calls for d in c.interim_delays(self.lookahead)]
        if name == "wait":
            return [
                v for c in self.calls if (v := c.first_partial_wait(self.lookahead)) is not None
            ]
        return [x for c in self.calls for x in c.lateness]

    def p(self, name: str, q: float) -> float:
        """Percentile q of a latency (ms): partial, word, wait, final, delay or late."""
        values = self._values(name)
        return float(np.percentile(values, q)) * 1000.0 if values else math.nan

    @property
    def rtf(self) -> float:
        return self.cpu_seconds / self.audio_seconds if self.audio_seconds else math.nan

    @property
    def early_finals(self) -> int:
        return sum(c.final() is None for c in self.calls)

    def problems(self) -> list[str]:
        """Why this level is not real time (empty: it is)."""
        bound = self.lag_bound * 1000.0
        out = []
        if self.failed:
            out.append(f"{len(self.failed)} calls failed ({self.failed[0]})")
        if not self.calls:
            out.append("no call finished within the level")
        if not self.p("late", 95) <= LATE_BOUND_MS:
            out.append(f"the client sent late (p95 {self.p('late', 95):.0f} ms)")
        for name, label in (("final", "final latency"), ("delay", "interim delay")):
            if self._values(name) and not self.p(name, 95) <= bound:
                out.append(f"{label} p95 {self.p(name, 95):.0f} ms > {bound:.0f} ms")
        return out


# -- audio ----------------------------------------------------------------------------------


def load_utterances(manifest: Path, limit: int) -> list[Audio]:
    out = []
    for utt in read_manifest(manifest)[:limit]:
        samples = load_audio(utt.path)
        pcm = (samples.clamp(-1.0, 1.0) * 32767).round().to(torch.int16)
        frames = samples[: samples.numel() // 160 * 160].view(-1, 160)
        rms = frames.pow(2).mean(dim=1).sqrt()
        loud = (rms > rms.max() * 10 ** (-SPEECH_DB / 20)).nonzero()
        start = int(loud[0]) * 0.01 if loud.numel() else 0.0
        seconds = samples.numel() / SAMPLE_RATE
        out.append(Audio(utt.id, utt.text, pcm.numpy().tobytes(), seconds, start))
    if not out:
        raise SystemExit(f"{manifest}: no utterances")
    return out


def chunked(audio: Audio, gap: float) -> tuple[list[bytes], list[float], int]:
    """The call's audio (`gap` s of silence, then the utterance) in CHUNK_MS pieces, their
    durations, and the first piece with speech."""
    pcm = bytes(2 * round(gap * SAMPLE_RATE)) + audio.pcm
    step = 2 * SAMPLE_RATE * CHUNK_MS // 1000
    chunks = [pcm[i : i + step] for i in range(0, len(pcm), step)]
    seconds = [len(c) / 2 / SAMPLE_RATE for c in chunks]
    speech = int((gap + audio.speech_start) * 1000) // CHUNK_MS
    return chunks, seconds, min(speech, len(chunks) - 1)


# -- the server process -----------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process and its running descendants (the server's model
    worker processes), all threads (Linux /proc)."""
    total = 0.0
    for stat in _tree_files(pid, "stat"):
        fields = stat.rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def memory_bytes(pid: int) -> int:
    """Proportional set size of a process and its descendants (Linux smaps_rollup): memory
    pages shared by the forked model workers (the weights) counted once between them."""
    total = 0
    for rollup in _tree_files(pid, "smaps_rollup"):
        for line in rollup.splitlines():
            if line.startswith("Pss:"):
                total += int(line.split()[1]) * 1024
    return total


def _tree_files(pid: int, name: str) -> Iterator[str]:
    """/proc/PID/`name` of `pid` and each running descendant (one that has just exited is
    skipped)."""
    for proc in _tree(pid):
        try:
            yield Path(f"/proc/{proc}/{name}").read_text()
        except OSError:
            continue


def _tree(pid: int) -> list[int]:
    """`pid` and its descendants."""
    found, todo = [], [pid]
    while todo:
        proc = todo.pop()
        found.append(proc)
        for task in Path(f"/proc/{proc}/task").glob("*/children"):
            try:
                todo += [int(child) for child in task.read_text().split()]
            except OSError:
                continue
    return found


class Server:
    """`asr serve` in a subprocess, ready (health SERVING) once `start` returns."""

    def __init__(self, bundle: Path, port: int, threads: int, extra: Sequence[str]) -> None:
        self.command = [
            sys.executable,
            "-m",
            "asr.cli",
            "serve",
            "--model",
            f"ctc={bundle}",
            "--port",
            str(port),
            "--torch-threads",
            str(threads),
            "--grace-seconds",
            "2",
            *extra,
        ]
        self.process: subprocess.Popen[bytes] | None = None
        self.target = ""
        self._files = contextlib.ExitStack()
        self._out: IO[bytes] | None = None
        self._err: IO[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def describe(self) -> str:
        return " ".join(["asr", *self.command[3:]])

    def start(self, timeout: float = 180.0) -> float:
        """Start and wait until SERVING; returns the seconds it took."""
        # Files, not pipes: nothing has to drain them while the server runs; `stop` closes them.
        self._out = self._files.enter_context(tempfile.TemporaryFile())  # noqa: SIM115
        self._err = self._files.enter_context(tempfile.TemporaryFile())  # noqa: SIM115
        began = time.monotonic()
        self.process = subprocess.Popen(self.command, stdout=self._out, stderr=self._err)
        while not self.target:
            self._check_alive(began, timeout)
            self._out.seek(0)
            match = re.search(rb"listening on (\S+):(\d+)", self._out.read())
            if match:
                self.target = f"127.0.0.1:{match.group(2).decode()}"
            else:
                time.sleep(0.1)
        with grpc.insecure_channel(self.target) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while True:
                self._check_alive(began, timeout)
                with contextlib.suppress(grpc.RpcError):
                    reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=2.0)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return time.monotonic() - began
                time.sleep(0.1)

    def _check_alive(self, began: float, timeout: float) -> None:
        assert self.process is not None
        code = self.process.poll()
        if code is not None or time.monotonic() - began > timeout:
            why = f"exited with status {code}" if code is not None else f"not ready in {timeout} s"
            raise SystemExit(f"the server {why}: {self.describe()}\n{self.stderr_tail()}")

    def stderr_tail(self, size: int = 4000) -> str:
        if self._err is None:
            return ""
        self._err.seek(0)
        return self._err.read().decode(errors="replace")[-size:]

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._files.close()


# -- streaming ----------------------------------------------------------------------------


def _streaming_config() -> asr_pb2.StreamingRecognizeRequest:
    config = Config(encoding=Config.LINEAR16, sample_rate_hertz=SAMPLE_RATE)
    settings = asr_pb2.StreamingRecognitionConfig(config=config, interim_results=True)
    return asr_pb2.StreamingRecognizeRequest(streaming_config=settings)


async def stream_call(stub: Any, call: Call, deadline: float) -> None:
    """Send `call`'s chunks at real-time pace and record every result's arrival."""
    loop = asyncio.get_running_loop()
    rpc = stub.StreamingRecognize(timeout=sum(call.chunk_seconds) + 60.0)

    async def read() -> None:
        while True:
            response = await rpc.read()
            if response is grpc.aio.EOF:
                return
            now = loop.time()
            for r in response.results:
                text = r.alternatives[0].transcript if r.alternatives else ""
                end = to_seconds(r.result_end_time)
                call.results.append((now, r.is_final, end, text))

    reader = asyncio.create_task(read())
    try:
        await rpc.write(_streaming_config())
        due = loop.time()
        for chunk, seconds in zip(call.chunks, call.chunk_seconds, strict=True):
            due += seconds  # a chunk goes once its audio would have been spoken
            if due > deadline:  # the level is over: drop this call
                rpc.cancel()
                return
            await asyncio.sleep(max(0.0, due - loop.time()))
            now = loop.time()
            call.lateness.append(max(0.0, now - due))
            await rpc.write(asr_pb2.StreamingRecognizeRequest(audio_content=chunk))
            call.sent.append(now)
        await rpc.done_writing()
        await reader
        call.done = loop.time()
    except grpc.aio.AioRpcError as err:
        call.error = f"{err.code().name}: {err.details()}"
    finally:
        if not reader.done():
            rpc.cancel()
        with contextlib.suppress(asyncio.CancelledError, grpc.aio.AioRpcError):
            await reader


async def run_level(
    target: str,
    pid: int,
    utterances: list[Audio],
    streams: int,
    seconds: float,
    gaps: tuple[float, float],
    lookahead: float,
    lag_bound: float,
) -> Level:
    """N streams for `seconds`; each call's silence is drawn from `gaps` (lowest, highest)."""
    loop = asyncio.get_running_loop()
    calls: list[Call] = []
    async with grpc.aio.insecure_channel(target) as channel:
        stub = asr_pb2_grpc.RecognizerStub(channel)
        await channel.channel_ready()
        begin = loop.time() + 0.2
        end = begin + seconds

        async def worker(i: int) -> None:
            k = i * len(utterances) // streams
            rng = random.Random(i)  # the same gaps in every run
            await asyncio.sleep(max(0.0, begin + i * CHUNK_MS / 1000 / streams - loop.time()))
            while loop.time() < end:
                index = k % len(utterances)
                chunks, chunk_seconds, speech = chunked(utterances[index], rng.uniform(*gaps))
                call = Call(index, chunks, chunk_seconds, speech)
                calls.append(call)
                await stream_call(stub, call, end)
                if call.error:  # this stream is dead (the failure is reported)
                    return
                k += 1

        peak = 0

        async def watch() -> None:  # the server's memory once a second
            nonlocal peak
            while True:
                peak = max(peak, memory_bytes(pid))
                await asyncio.sleep(1.0)

        await asyncio.sleep(max(0.0, begin - loop.time()))
        cpu0, client0 = cpu_seconds(pid), time.process_time()
        watcher = asyncio.create_task(watch())
        await asyncio.gather(*(worker(i) for i in range(streams)))
        watcher.cancel()
        cpu1, client1 = cpu_seconds(pid), time.process_time()
        wall = loop.time() - begin
    finished = [c for c in calls if not math.isnan(c.done)]  # cancelled ones never finish
    audio = sum(
        s for c in calls for t, s in zip(c.sent, c.chunk_seconds, strict=False) if t >= begin
    )
    return Level(
        streams=streams,
        calls=finished,
        failed=[c.error for c in calls if c.error],
        cpu_seconds=cpu1 - cpu0,
        audio_seconds=audio,
        wall_seconds=wall,
        client_cpu_seconds=client1 - client0,
        lookahead=lookahead,
        lag_bound=lag_bound,
        memory_bytes=peak,
    )


# -- unary --------------------------------------------------------------------------------


@dataclass
class Unary:
    wall: float
    audio: float
    cpu: float
    latencies: list[float]
    texts: list[str]

    @property
    def throughput(self) -> float:
        return self.audio / self.wall


async def run_unary(target: str, pid: int, utterances: list[Audio], callers: int) -> Unary:
    config = Config(encoding=Config.LINEAR16, sample_rate_hertz=SAMPLE_RATE)
    texts = [""] * len(utterances)
    latencies: list[float] = []
    async with grpc.aio.insecure_channel(target) as channel:
        stub = asr_pb2_grpc.RecognizerStub(channel)
        await channel.channel_ready()
        for audio in utterances[:2]:  # warm-up, untimed
            await stub.Recognize(asr_pb2.RecognizeRequest(config=config, audio=audio.pcm))
        todo = iter(range(len(utterances)))

        async def caller() -> None:
            for i in todo:
                t = time.monotonic()
                request = asr_pb2.RecognizeRequest(config=config, audio=utterances[i].pcm)
                response = await stub.Recognize(request, timeout=600.0)
                latencies.append(time.monotonic() - t)
                texts[i] = " ".join(r.alternatives[0].transcript for r in response.results)

        cpu0, t0 = cpu_seconds(pid), time.monotonic()
        await asyncio.gather(*(caller() for _ in range(callers)))
        wall, cpu = time.monotonic() - t0, cpu_seconds(pid) - cpu0
    return Unary(wall, sum(u.seconds for u in utterances), cpu, latencies, texts)


# -- the peer -----------------------------------------------------------------------------


def pocketsphinx_rtf(utterances: list[Audio]) -> tuple[float, float, float, list[str], str]:
    """(RTF, CPU s, audio s, hypotheses, version): one thread, 100 ms chunks per utterance."""
    try:
        import pocketsphinx
    except ImportError as err:
        raise SystemExit(
            f"pocketsphinx is needed for the peer ({err}): pip install -e '.[bench]'"
        ) from err
    from importlib.metadata import version

    decoder = pocketsphinx.Decoder(loglevel="FATAL")  # bundled en-us acoustic model, LM, dict
    step = 2 * SAMPLE_RATE * CHUNK_MS // 1000
    hyps = []
    cpu = 0.0
    for audio in utterances:
        t = time.thread_time()
        decoder.start_utt()
        for i in range(0, len(audio.pcm), step):
            decoder.process_raw(audio.pcm[i : i + step], False, False)
        decoder.end_utt()
        hyp = decoder.hyp()
        cpu += time.thread_time() - t
        hyps.append(hyp.hypstr if hyp is not None else "")
    seconds = sum(u.seconds for u in utterances)
    return cpu / seconds, cpu, seconds, hyps, version("pocketsphinx")


# -- report -------------------------------------------------------------------------------


def _met(ok: bool) -> str:
    return "met" if ok else "MISSED"


def _wer(refs: list[str], hyps: list[str]) -> str:
    if not refs:
        return "n/a"
    return f"{error_rates(refs, hyps).wer:.1f} % over {len(refs)} utterances"


def lookahead_of(
    bundle_dir: Path, chunking: tuple[int, int] | None = None
) -> tuple[float, float, str]:
    """Audio (s) the server needs beyond a result's end before it can send it (the encoder's
    right context, plus the feature window's overhang), the encoder's block (s), and the
    model's latency structure in words. chunking: the server's --chunk-size/--right-context."""
    recognizer = load_model(bundle_dir, chunking=chunking)
    model = recognizer.bundle.model
    if not recognizer.can_stream or not isinstance(model, BiLSTMCTC):
        raise SystemExit(
            f"{bundle_dir}: a latency-controlled BiLSTM-CTC is needed (an offline one streams "
            "with --chunk-size)"
        )
    features = recognizer.bundle.feature_config
    frame = features.hop_ms / 1000 * model.time_reduction
    chunk, right = model.config.chunk_size * frame, model.config.right_context * frame
    overhang = (features.window_ms - features.hop_ms) / 1000
    text = (
        f"latency-controlled BiLSTM-CTC, blocks of {chunk * 1000:.0f} ms + "
        f"{right * 1000:.0f} ms right context: a frame's output can wait up to "
        f"{(chunk + right + overhang) * 1000:.0f} ms of audio"
    )
    return right + overhang, chunk, text


def machine() -> str:
    """The CPU model, its vector instruction sets and torch's CPU build, so that figures from
    different machines can be compared."""
    model, flags = "unknown CPU", set()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            name, _, value = line.partition(":")
            if name.strip() == "model name":
                model = value.strip()
            elif name.strip() == "flags":
                flags = set(value.split())
    sets = [label for flag, label in VECTOR_SETS.items() if flag in flags] or ["none listed"]
    build = torch.__config__.show()
    versions = [
        m.group(0).strip() for pattern in BUILD_PATTERNS if (m := re.search(pattern, build))
    ]
    return (
        f"{model}; {', '.join(sets)}; torch {torch.__version__} "
        f"(CPU capability {torch.backends.cpu.get_cpu_capability()}; "
        f"{'; '.join(versions) or 'no MKL/oneDNN listed'})"
    )


def run_levels(
    server: Server,
    loop_set: list[Audio],
    levels_wanted: list[int],
    args: argparse.Namespace,
    gaps: tuple[float, float],
    lookahead: float,
) -> list[Level]:
    """The streaming levels in order, printed as a table, up to the first not real time. If
    the first fails, N halves until one stays real time (or N = 1 fails), so the largest
    real-time N, and the batching gain over it, is always measured, never taken as 0."""
    print(
        "    N  calls  first partial p50/p95 ms  final p50/p95 ms  interim delay p95 ms"
        "  late p95 ms  server CPU  rtf    server MiB  client CPU  real time"
    )
    levels: list[Level] = []
    pending = list(levels_wanted)
    while pending:
        n = pending.pop(0)
        level = asyncio.run(
            run_level(
                server.target,
                server.pid,
                loop_set,
                n,
                args.duration,
                gaps,
                lookahead,
                args.lag_bound_ms / 1000,
            )
        )
        levels.append(level)
        problems = level.problems()
        print(
            f"  {n:3d}  {len(level.calls):5d}  {level.p('partial', 50):9.0f} / "
            f"{level.p('partial', 95):5.0f}     {level.p('final', 50):7.0f} / "
            f"{level.p('final', 95):5.0f}  {level.p('delay', 95):20.0f}  "
            f"{level.p('late', 95):11.0f}  "
            f"{100 * level.cpu_seconds / level.wall_seconds:8.0f} %  {level.rtf:.3f}  "
            f"{level.memory_bytes / 2**20:10.0f}  "
            f"{100 * level.client_cpu_seconds / level.wall_seconds:8.0f} %  "
            f"{'yes' if not problems else 'no: ' + '; '.join(problems)}",
            flush=True,
        )
        if level.early_finals:
            print(f"        ({level.early_finals} calls: last final before the end of audio)")
        if problems:
            if n > 1 and all(lv.problems() for lv in levels):
                pending = [n // 2]  # nothing kept real time yet: look below
                continue
            break
    return levels


def largest_realtime(levels: list[Level]) -> tuple[int, Level]:
    """The largest real-time N (0 if none) and the level the figures are taken at."""
    realtime = [lv for lv in levels if not lv.problems()]
    return (realtime[-1].streams, realtime[-1]) if realtime else (0, levels[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    synthetic = REPO / "exp/synthetic"
    parser.add_argument("--model", type=Path, required=True, help="streaming BiLSTM-CTC bundle")
    parser.add_argument(
        "--manifest", type=Path, default=synthetic / "data/manifests/heldout-sentences.jsonl"
    )
    parser.add_argument("--utterances", type=int, default=100, help="utterances to loop over")
    parser.add_argument(
        "--streams", default="8,16,32,48,64,96,128,160,192,256", help="N to try (batched)"
    )
    parser.add_argument(
        "--per-stream-streams", default="2,4,8,12,16,20,24,32,48,64", help="N to try, per-stream"
    )
    parser.add_argument("--duration", type=float, default=60.0, help="seconds per level")
    parser.add_argument(
        "--gap", type=float, default=0.2, help="least silence before each utterance (s)"
    )
    parser.add_argument("--lag-bound-ms", type=float, default=500.0, help="real-time bound")
    parser.add_argument("--callers", type=int, default=32, help="concurrent unary callers")
    parser.add_argument("--unary-utterances", type=int, default=100)
    parser.add_argument("--peer-utterances", type=int, default=20, help="for pocketsphinx")
    parser.add_argument("--port", type=int, default=0, help="server port (0: any free one)")
    parser.add_argument("--server-threads", type=int, default=1, help="asr serve --torch-threads")
    parser.add_argument(
        "--workers", type=int, default=0, help="asr serve --workers (0: its default, one per core)"
    )
    parser.add_argument(
        "--chunk-size", type=int, help="asr serve --chunk-size (LC block, encoder frames)"
    )
    parser.add_argument("--right-context", type=int, help="asr serve --right-context")
    parser.add_argument(
        "--quantize", choices=QUANTIZATIONS, default="none", help="asr serve --quantize"
    )
    parser.add_argument("--quick", action="store_true", help="a short smoke run")
    args = parser.parse_args()
    if args.quick:
        args.streams, args.per_stream_streams = "2,4", "2"
        args.duration = min(args.duration, 10.0)
        args.utterances, args.unary_utterances, args.peer_utterances = 16, 16, 2
        args.callers = min(args.callers, 16)
    levels_wanted = [int(n) for n in args.streams.split(",")]
    per_stream_wanted = [int(n) for n in args.per_stream_streams.split(",")]
    chunking = None
    if args.chunk_size is not None:
        right = args.chunk_size // 2 if args.right_context is None else args.right_context
        chunking = (args.chunk_size, right)
    lookahead, block, structure = lookahead_of(args.model, chunking)
    utterances = load_utterances(args.manifest, max(args.utterances, args.unary_utterances))
    loop_set = utterances[: args.utterances]
    total = sum(u.seconds for u in loop_set)
    print(
        f"{args.model}: {structure}; {len(loop_set)} utterances ({total:.0f} s) from "
        f"{args.manifest.name}; {os.cpu_count()} CPU cores; server workers "
        f"{args.workers or 'one per core'}, torch threads {args.server_threads} each"
    )
    print(f"machine: {machine()}")

    peer = loop_set[: args.peer_utterances]
    ps_rtf, ps_cpu, ps_audio, ps_hyps, ps_version = pocketsphinx_rtf(peer)
    print(
        f"pocketsphinx {ps_version} (bundled en-us model), one thread, 100 ms chunks: "
        f"{ps_audio:.1f} s audio in {ps_cpu:.1f} CPU s, RTF {ps_rtf:.3f}; WER "
        f"{_wer([u.text for u in peer], ps_hyps)}"
    )

    server_args = []
    if chunking is not None:
        server_args = ["--chunk-size", str(chunking[0]), "--right-context", str(chunking[1])]
    # both servers run the same model on the same workers
    server_args += ["--quantize", args.quantize, "--workers", str(args.workers)]
    most = max(levels_wanted + per_stream_wanted) + 8
    gaps = (args.gap, args.gap + block)
    print(
        f"streaming: {CHUNK_MS} ms LINEAR16 chunks at real-time pace, one call per "
        f"utterance after {gaps[0]:.2f}-{gaps[1]:.2f} s of silence, interim results on, "
        f"{args.duration:.0f} s per level; real time: final and interim delay p95 <= "
        f"{args.lag_bound_ms:.0f} ms, no failures, client late p95 <= {LATE_BOUND_MS:.0f} ms"
    )
    # The batched server (defaults: streams batched, Recognize micro-batched), then the
    # per-stream one (--max-stream-batch 1 --max-batch 1: each chunk and call alone), same
    # model and load: their ratios are the batching gains.
    runs: dict[str, tuple[list[Level], Unary, int]] = {}
    for label, flags, wanted in (
        ("batched (server defaults)", (), levels_wanted),
        ("per-stream (--max-stream-batch 1 --max-batch 1)", PER_STREAM, per_stream_wanted),
    ):
        server = Server(
            args.model,
            args.port,
            args.server_threads,
            ["--max-streams", str(most), *flags, *server_args],
        )
        try:
            ready = server.start()
            print(f"{label} server: {server.describe()} (pid {server.pid}), ready in {ready:.1f} s")
            # Warm up (first calls pay for lazy initialisation): a few of each, not measured.
            asyncio.run(run_unary(server.target, server.pid, loop_set[:4], 2))
            asyncio.run(run_level(server.target, server.pid, loop_set, 1, 3.0, gaps, 0.0, 1.0))
            idle = memory_bytes(server.pid)
            levels = run_levels(server, loop_set, wanted, args, gaps, lookahead)
            recognized = asyncio.run(
                run_unary(
                    server.target, server.pid, utterances[: args.unary_utterances], args.callers
                )
            )
            runs[label] = (levels, recognized, idle)
        except grpc.RpcError as err:
            tail = server.stderr_tail()
            raise SystemExit(f"a call failed: {err}\nserver stderr:\n{tail}") from err
        finally:
            server.stop()
    (levels, batched, idle), (single_levels, single, _) = runs.values()

    n_rt, best = largest_realtime(levels)
    n_single, best_single = largest_realtime(single_levels)
    if n_rt:
        print(f"largest real-time N batched: {n_rt} (figures below are at N={n_rt})")
    else:
        print(f"no level stayed real time batched; figures below are at N={best.streams}")
    print(f"largest real-time N per-stream: {n_single} (rtf {best_single.rtf:.3f})")
    print(
        f"server memory (PSS, workers included): {idle / 2**20:.0f} MiB idle after warm-up, "
        f"{best.memory_bytes / 2**20:.0f} MiB peak at N={best.streams}: "
        f"{(best.memory_bytes - idle) / max(best.streams, 1) / 2**20:.2f} MiB per stream"
    )
    refs, hyps = [], []
    seen = set()
    for call in best.calls:
        if call.utterance not in seen:
            seen.add(call.utterance)
            refs.append(loop_set[call.utterance].text)
            hyps.append(call.text())
    print(f"streaming WER (ours): {_wer(refs, hyps)}")
    print(
        f"first partial at N={best.streams}: p50 {best.p('partial', 50):.0f} ms after the speech "
        f"chunk, of which p50 {best.p('wait', 50):.0f} ms waiting for the audio it needs "
        f"(model look-ahead and blocks); interim delay p50 {best.p('delay', 50):.0f} ms"
    )
    print(
        f"first word (the final's, complete) at N={best.streams}: p50 {best.p('word', 50):.0f} "
        f"ms, p95 {best.p('word', 95):.0f} ms after the speech chunk"
    )

    gain = batched.throughput / single.throughput
    stream_gain = n_rt / n_single if n_single else math.inf
    unary = utterances[: args.unary_utterances]
    same = sum(a == b for a, b in zip(batched.texts, single.texts, strict=True))
    unary_audio = batched.audio
    for label, u in (("micro-batching on (server defaults)", batched), ("--max-batch 1", single)):
        print(
            f"unary Recognize, {label}: {len(u.texts)} utterances ({unary_audio:.0f} s) from "
            f"{args.callers} callers in {u.wall:.1f} s: {u.throughput:.1f} audio s/s, latency "
            f"p50 {1000 * float(np.median(u.latencies)):.0f} ms, server CPU RTF "
            f"{u.cpu / u.audio:.4f}"
        )
    print(
        f"same unary transcripts batched and unbatched: {same}/{len(unary)}; unary WER "
        f"{_wer([u.text for u in unary], batched.texts)}"
    )

    rtf = best.rtf
    vs_ps = ps_rtf / rtf
    final95, partial95 = best.p("final", 95), best.p("partial", 95)
    print(f"targets (streaming figures at N={best.streams}):")
    print(
        f"  real-time streams {n_rt} (target >= {TARGET_STREAMS}): {_met(n_rt >= TARGET_STREAMS)}"
    )
    print(
        f"  stream batching gain {stream_gain:.2f}x = {n_rt} / {n_single} real-time streams "
        f"(target >= {TARGET_STREAM_BATCHING:.0f}x): {_met(stream_gain >= TARGET_STREAM_BATCHING)}"
    )
    print(
        f"  final latency p95 {final95:.0f} ms (target <= {TARGET_FINAL_MS:.0f} ms): "
        f"{_met(final95 <= TARGET_FINAL_MS)}"
    )
    print(
        f"  first partial p95 {partial95:.0f} ms (target <= {TARGET_PARTIAL_MS:.0f} ms): "
        f"{_met(partial95 <= TARGET_PARTIAL_MS)}"
    )
    print(
        f"  unary batching gain {gain:.2f}x (target >= {TARGET_BATCHING:.0f}x): "
        f"{_met(gain >= TARGET_BATCHING)}"
    )
    print(
        f"  server CPU RTF {rtf:.3f} streaming vs pocketsphinx {ps_rtf:.3f}: {vs_ps:.2f}x "
        f"less CPU per audio second (target >= {TARGET_VS_PEER:.0f}x): "
        f"{_met(vs_ps >= TARGET_VS_PEER)}"
    )
    meeting = [
        lv.streams
        for lv in levels
        if not lv.problems()
        and lv.p("final", 95) <= TARGET_FINAL_MS
        and lv.p("partial", 95) <= TARGET_PARTIAL_MS
    ]
    print(f"largest N meeting both latency targets: {max(meeting) if meeting else 'none'}")
    print(
        f"server streams_realtime={n_rt} final_p95_ms={final95:.0f} "
        f"first_partial_p95_ms={partial95:.0f} rtf={rtf:.3f} vs_pocketsphinx={vs_ps:.2f}x "
        f"batching_gain={gain:.2f}x stream_batching_gain={stream_gain:.2f}x "
        f"first_word_p95_ms={best.p('word', 95):.0f}"
    )


if __name__ == "__main__":
    main()
