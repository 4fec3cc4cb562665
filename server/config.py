"""Server settings: what to load, limits, batching, threads. One frozen dataclass."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from asr.config import Config
from asr.quantize import check_quantization
from asr.streaming import EndpointConfig


@dataclass(frozen=True)
class ServerConfig(Config):
    models: tuple[tuple[str, str], ...]  # (name, bundle directory); the first is the default
    # (model name, LAS bundle directory): that CTC model's final results come from the LAS
    # attention decoder scored jointly with the CTC posteriors (method joint; a client may ask
    # for rescore, its n-best rescored), for Recognize and streaming finals alike.
    rescorers: tuple[tuple[str, str], ...] = ()
    # (model name, LM bundle directory or ARPA file): the language model that model's beam
    # searches fuse (streaming partials and finals too), at its default weight.
    lms: tuple[tuple[str, str], ...] = ()
    # (chunk_size, right_context) in encoder frames for every BiLSTM-CTC model, instead of
    # its bundle's: shorter latency-controlled blocks give earlier partial results.
    chunking: tuple[int, int] | None = None
    # "int8": every model (and rescorer) runs with int8 LSTM and Linear weights on CPU
    # (asr.quantize); "none": float weights.
    quantize: str = "none"
    host: str = "127.0.0.1"
    port: int = 50051  # 0: any free port (tests)
    # More get RESOURCE_EXHAUSTED. 0: sized at start-up from the measured capacity of the
    # engine and memory (server.capacity).
    max_concurrent_streams: int = 0
    max_stream_seconds: float = 3600.0  # audio per stream; more gets OUT_OF_RANGE
    max_unary_seconds: float = 600.0  # audio per Recognize; more gets INVALID_ARGUMENT
    max_message_bytes: int = 32 * 1024 * 1024  # larger messages get RESOURCE_EXHAUSTED
    # Search sizes a request may ask for; more gets INVALID_ARGUMENT. Decoding cost grows with
    # the beam (CTC prefix search: beam x beam candidates per frame; attention search: a
    # decoder step per hypothesis), and every call shares one model worker. Our decoders
    # need 10 (CTC prefix search's default) or 4-10 (LAS); 64 leaves room for experiments.
    max_beam: int = 64
    max_alternatives: int = 10  # n-best per result (at most the beam)
    # Model workers, each with its own model lock, threads and batching (server.engine);
    # 0: one per core this process may run on, over torch_threads.
    workers: int = 0
    torch_threads: int = 1  # intra-op threads of each model worker
    max_batch: int = 16  # Recognize calls decoded together (dynamic micro-batching)
    max_wait_ms: float = 10.0  # how long the first call of a batch waits for company
    # Stream chunks run together (encoder and search batched across streams; 1: each alone)
    # and how long the first chunk of such a batch waits for company.
    max_stream_batch: int = 128
    stream_wait_ms: float = 10.0
    grace_seconds: float = 10.0  # on SIGTERM, in-flight calls get this long to finish
    endpoint: EndpointConfig = field(default_factory=EndpointConfig)
    auth_token: str | None = None  # if set, calls need `authorization: Bearer <token>`
    metrics_port: int | None = None  # Prometheus /metrics over HTTP (0: any free port)
    # The OpenAI-compatible HTTP API (server.openai_http) on this port (0: any free port),
    # and how many of its transcriptions may be in flight (more get 429).
    http_port: int | None = None
    max_http_requests: int = 64
    tls_cert: str | None = None  # PEM certificate chain; with tls_key the port speaks TLS only
    tls_key: str | None = None  # PEM private key

    def __post_init__(self) -> None:
        if not self.models:
            raise ValueError("at least one model (NAME=BUNDLE_DIR) is needed")
        names = [name for name, _ in self.models]
        if len(set(names)) != len(names):
            raise ValueError(f"model names must be unique: {', '.join(names)}")
        for what, pairs in (("rescorer", self.rescorers), ("language model", self.lms)):
            for name, _ in pairs:
                if name not in names:
                    raise ValueError(
                        f"{what} for unknown model {name!r}; models: {', '.join(names)}"
                    )
        check_quantization(self.quantize)  # a QuantizationError is a ValueError
        if self.chunking is not None and (self.chunking[0] < 1 or self.chunking[1] < 0):
            raise ValueError(
                f"chunking needs chunk_size >= 1 and right_context >= 0: {self.chunking}"
            )
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("TLS needs both a certificate and a private key")
        positive = (
            "max_stream_seconds",
            "max_unary_seconds",
            "max_message_bytes",
            "torch_threads",
            "max_batch",
            "max_stream_batch",
            "max_beam",
            "max_alternatives",
            "max_http_requests",
        )
        self.check(
            {name: (getattr(self, name) > 0, "> 0") for name in positive}
            | {
                "workers": (self.workers >= 0, ">= 0 (0: one per core)"),
                "max_concurrent_streams": (
                    self.max_concurrent_streams >= 0,
                    ">= 0 (0: from the measured capacity)",
                ),
                "max_wait_ms": (self.max_wait_ms >= 0, ">= 0"),
                "stream_wait_ms": (self.stream_wait_ms >= 0, ">= 0"),
                "grace_seconds": (self.grace_seconds >= 0, ">= 0"),
            }
        )

    @property
    def worker_count(self) -> int:
        """`workers`, or where it is 0 one per core this process may use (its CPU affinity,
        which containers and taskset narrow) over `torch_threads`."""
        if self.workers:
            return self.workers
        return max(1, len(os.sched_getaffinity(0)) // self.torch_threads)
