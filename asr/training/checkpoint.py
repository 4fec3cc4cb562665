"""Training checkpoints: atomic writes, `weights_only` loading, rotation and averaging.

A checkpoint holds only tensors and plain containers, so it loads with
`torch.load(weights_only=True)` and never executes code from the file.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from asr.files import atomic_write
from asr.models.layers import upgrade_keys

_NAME = re.compile(r"^ckpt-(\d{8})\.pt$")


def checkpoint_path(exp_dir: Path, step: int) -> Path:
    return exp_dir / f"ckpt-{step:08d}.pt"


def list_checkpoints(exp_dir: str | Path) -> list[Path]:
    """Finished checkpoints, oldest first (temp files from an interrupted write are ignored)."""
    root = Path(exp_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def save_atomic(state: dict[str, Any], path: Path) -> None:
    """Write to a temp file, fsync, rename, fsync the directory: a crash at any moment leaves
    either the old set of checkpoints or the new one, never a truncated file."""
    with atomic_write(path, fsync=True) as tmp, tmp.open("wb") as f:
        torch.save(state, f)


def load(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except (OSError, RuntimeError, EOFError) as err:
        raise ValueError(f"{path}: cannot load checkpoint ({err})") from err
    if not isinstance(state, dict) or "model" not in state:
        raise ValueError(f"{path}: not a training checkpoint")
    return state


def rotate(exp_dir: Path, keep_last: int) -> None:
    """Delete all but the newest `keep_last` checkpoints."""
    for old in list_checkpoints(exp_dir)[:-keep_last] if keep_last > 0 else []:
        old.unlink(missing_ok=True)


def average_models(paths: list[Path]) -> dict[str, torch.Tensor]:
    """Element-wise mean of the model weights of several checkpoints (in float64, then cast
    back), the usual last-N averaging that gives a small, free WER gain."""
    if not paths:
        raise ValueError("no checkpoints to average")
    first = load(paths[0])["model"]
    # Integer buffers (counters) are not averaged: the first checkpoint's are kept.
    total = {k: v.to(torch.float64) for k, v in first.items() if v.is_floating_point()}
    for path in paths[1:]:
        weights = load(path)["model"]
        for name in total:
            total[name] += weights[name].to(torch.float64)
    return {
        name: (total[name] / len(paths)).to(value.dtype) if name in total else value
        for name, value in first.items()
    }


def initial_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """Model weights to start training from: a bundle directory (its model.safetensors), a
    .safetensors file, or a training checkpoint (.pt)."""
    from safetensors.torch import load_file

    source = Path(path)
    if source.is_dir():
        source = source / "model.safetensors"
    if not source.is_file():
        raise ValueError(f"{path}: no model weights (a bundle directory or a checkpoint file)")
    if source.suffix == ".safetensors":
        return load_file(str(source))
    return dict(load(source)["model"])


def transfer(model: torch.nn.Module, weights: dict[str, torch.Tensor]) -> list[str]:
    """Copy every tensor of `weights` whose name and shape match into `model`; returns the
    names of the model's tensors left as initialised (new or reshaped layers), for the log."""
    own = model.state_dict()
    weights = upgrade_keys(model, weights)  # names from before the models shared BiRNN
    matching = {k: v for k, v in weights.items() if k in own and own[k].shape == v.shape}
    if not matching:
        raise ValueError("the initial weights share no tensor with this model")
    model.load_state_dict(matching, strict=False)
    return sorted(set(own) - set(matching))
