"""The generated API code imports with the installed grpcio/protobuf and describes the service
the server implements (its freshness against proto/ is `make proto-check`)."""

from __future__ import annotations

from asr.v1 import asr_pb2, asr_pb2_grpc
from server.servicer import RecognizerServicer


def test_service_has_the_three_rpcs() -> None:
    service = asr_pb2.DESCRIPTOR.services_by_name["Recognizer"]
    methods = {m.name: m for m in service.methods}
    assert set(methods) == {"Recognize", "StreamingRecognize", "ListModels"}
    streaming = methods["StreamingRecognize"]
    assert streaming.client_streaming and streaming.server_streaming
    assert hasattr(asr_pb2_grpc, "RecognizerStub") and hasattr(asr_pb2_grpc, "RecognizerServicer")


def test_the_servicer_implements_every_rpc_of_the_proto() -> None:
    """Each RPC the proto declares is the server's own, not the generated UNIMPLEMENTED stub."""
    service = asr_pb2.DESCRIPTOR.services_by_name["Recognizer"]
    for method in service.methods:
        ours = getattr(RecognizerServicer, method.name)
        assert ours is not getattr(asr_pb2_grpc.RecognizerServicer, method.name), method.name
