"""The gRPC service over the `asr` library (built on `asr.recognizer.Recognizer`)."""
