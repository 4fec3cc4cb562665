"""`python -m asr.healthcheck`: exit 0 when a server's grpc.health.v1 says SERVING.

The Docker image's HEALTHCHECK and `make demo` use it (grpc_health_probe as a Python module):

    python -m asr.healthcheck --server localhost:50051             # one probe
    python -m asr.healthcheck --server localhost:50051 --wait 120  # until SERVING or 120 s

The server reports SERVING only once its models are loaded, and NOT_SERVING while it drains.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def probe(target: str, service: str = "", timeout: float = 5.0) -> str:
    """The serving status name (SERVING, NOT_SERVING, ...) or the RPC error code's name."""
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            response = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        except grpc.RpcError as err:
            return str(err.code().name)
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(response.status))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m asr.healthcheck", description=__doc__)
    parser.add_argument("--server", default="localhost:50051", help="HOST:PORT")
    parser.add_argument("--service", default="", help="service name ('' is the whole server)")
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds per probe")
    parser.add_argument("--wait", type=float, default=0.0, help="retry for up to this many s")
    args = parser.parse_args(argv)
    deadline = time.monotonic() + args.wait
    while True:
        status = probe(args.server, args.service, args.timeout)
        if status == "SERVING" or time.monotonic() >= deadline:
            break
        time.sleep(0.5)
    print(f"{args.server}: {status}")
    return 0 if status == "SERVING" else 1


if __name__ == "__main__":
    sys.exit(main())
