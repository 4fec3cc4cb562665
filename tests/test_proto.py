"""The generated API code imports with the installed grpcio/protobuf and describes the service
the server implements (its freshness against proto/ is `make proto-check`)."""

from __future__ import annotations

from asr.v1 import asr_pb2, asr_pb2_grpc


def test_service_has_the_three_rpcs() -> None:
    service = asr_pb2.DESCRIPTOR.services_by_name["Recognizer"]
    methods = {m.name: m for m in service.methods}
    assert set(methods) == {"Recognize", "StreamingRecognize", "ListModels"}
    streaming = methods["StreamingRecognize"]
    assert streaming.client_streaming and streaming.server_streaming
    assert hasattr(asr_pb2_grpc, "RecognizerStub") and hasattr(asr_pb2_grpc, "RecognizerServicer")


def test_messages_round_trip() -> None:
    config = asr_pb2.RecognitionConfig(
        encoding=asr_pb2.RecognitionConfig.LINEAR16, sample_rate_hertz=8000, max_alternatives=3
    )
    first = asr_pb2.StreamingRecognizeRequest(
        streaming_config=asr_pb2.StreamingRecognitionConfig(config=config, interim_results=True),
        request_id="abc",
    )
    parsed = asr_pb2.StreamingRecognizeRequest.FromString(first.SerializeToString())
    assert parsed.WhichOneof("streaming_request") == "streaming_config"
    assert parsed.streaming_config.config.sample_rate_hertz == 8000
    audio = asr_pb2.StreamingRecognizeRequest(audio_content=b"\x00\x01")
    assert audio.WhichOneof("streaming_request") == "audio_content"
