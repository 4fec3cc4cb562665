"""asr: a small, complete speech recognition toolkit (BiLSTM-CTC and LAS) and gRPC service."""

__version__ = "0.1.0"

from asr.bundle import Bundle, load_model

__all__ = ["Bundle", "__version__", "load_model"]
