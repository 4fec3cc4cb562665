"""Prometheus metrics on an HTTP port: requests and errors by status code, active streams,
audio seconds, latency and real-time factor (model time per audio second)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
RTF_BUCKETS = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0)


class Metrics:
    """One registry per server, so tests and several servers in a process stay apart."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "asr_requests",
            "Finished RPCs by method and status code",
            ["method", "code"],
            registry=r,
        )
        self.active_streams = Gauge(
            "asr_active_streams", "Open StreamingRecognize calls", registry=r
        )
        self.audio_seconds = Counter(
            "asr_audio_seconds", "Seconds of audio recognized", ["method"], registry=r
        )
        self.latency = Histogram(
            "asr_request_seconds",
            "Recognize: request to response; StreamingRecognize: last audio to last result",
            ["method"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.rtf = Histogram(
            "asr_real_time_factor",
            "Model-thread seconds per second of audio (queueing excluded; a micro-batch's time "
            "shared by audio length)",
            ["method"],
            buckets=RTF_BUCKETS,
            registry=r,
        )

    def serve(self, host: str, port: int) -> int:
        """Expose /metrics over HTTP; returns the port (useful with port 0)."""
        server, _ = start_http_server(port, addr=host, registry=self.registry)
        return int(server.server_port)
