"""int8 CPU inference: torch's dynamic quantization of an acoustic model's LSTM and Linear
layers (weights stored as int8, activations quantized on the fly per batch).

Why this and not ONNX Runtime: the models' latency-controlled streaming carries LSTM state
between blocks through our own `BiRNN`, which dynamic quantization keeps as it is (it swaps
the `nn.LSTM`/`nn.Linear` modules inside), so the streaming, batching and decoding code paths
stay the same; on the 2-core development machine it made the cpu-small BiLSTM-CTC's forward
pass 2.8x faster (8 utterances x 10 s, one thread, 2026-12-03).

`torch.ao.quantization` is deprecated upstream (torchao replaces it), so `quantize_model`
checks that the API and a quantized CPU engine exist in the installed torch and names what is
missing if not, rather than failing inside a request. Only CPU: torch has no CUDA kernels for
dynamically quantized modules.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import TypeVar, cast

import torch
from torch import nn

M = TypeVar("M", bound=nn.Module)

# What a model's weights become; "none" is the float model itself.
QUANTIZATIONS = ("none", "int8")


class QuantizationError(ValueError):
    """The requested quantization cannot run here (unknown kind, CUDA, or missing in torch)."""


def _dynamic_int8(model: nn.Module) -> nn.Module:
    namespace = getattr(getattr(torch, "ao", None), "quantization", None)
    api: Callable[..., nn.Module] | None = getattr(namespace, "quantize_dynamic", None)
    if api is None:
        raise QuantizationError(
            f"int8 needs torch.ao.quantization.quantize_dynamic, which torch {torch.__version__} "
            "does not have; run without --quantize"
        )
    engines = [e for e in torch.backends.quantized.supported_engines if e != "none"]
    if not engines:
        raise QuantizationError(
            f"int8: torch {torch.__version__} has no quantized CPU engine (fbgemm, x86 or "
            "qnnpack) on this machine; run without --quantize"
        )
    if torch.backends.quantized.engine == "none":
        torch.backends.quantized.engine = engines[0]
    with warnings.catch_warnings():
        # The deprecation notice, once per call; this module's docstring says why we use it.
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", message=".*torch.ao.quantization is deprecated.*")
        warnings.filterwarnings("ignore", message=".*quantize_per_tensor.*")
        return api(model, {nn.LSTM, nn.Linear}, dtype=torch.qint8)


_QUANTIZE: dict[str, Callable[[nn.Module], nn.Module]] = {
    "none": lambda model: model,
    "int8": _dynamic_int8,
}


def check_quantization(kind: str, device: str | torch.device = "cpu") -> None:
    """QuantizationError unless `kind` can run on `device` (checked before loading anything)."""
    if kind not in _QUANTIZE:
        raise QuantizationError(
            f"unknown quantization {kind!r}; choose one of {', '.join(QUANTIZATIONS)}"
        )
    if kind != "none" and torch.device(device).type != "cpu":
        raise QuantizationError(f"{kind} inference runs on CPU only, not {device}")


def quantize_model(model: M, kind: str, device: str | torch.device = "cpu") -> M:
    """A copy of `model` (in eval mode) with its weights quantized as `kind` (the model
    itself for "none"): the same class, its LSTM and Linear submodules swapped. Raises
    QuantizationError with what to do instead."""
    check_quantization(kind, device)
    return cast(M, _QUANTIZE[kind](model.eval()))
