"""asr: a small, complete speech recognition toolkit (BiLSTM-CTC and LAS) and gRPC service."""

__version__ = "0.1.0"
