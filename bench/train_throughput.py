"""Training throughput of a preset's models, and our padded-with-reversal BiLSTM input
against PyTorch's packed-sequence bidirectional LSTM (the peer), in the same run.

    python bench/train_throughput.py [--steps 6] [--batch 8] [--seconds 8] [--device cpu]
    python bench/train_throughput.py --device cuda --preset librispeech-100h --precision bf16

With a LibriSpeech preset it also prints the recipe's GPU-hour estimate: the preset's training
hours times its epochs (asr.training.config.PRESETS) over the measured audio seconds per second.

Each measurement is a full training step (forward, CTC/attention loss, backward, AdamW) on
random features shaped like a bucketed batch: `--batch` utterances of about `--seconds` s with
4 subword targets per second. Throughput is audio seconds per wall second (best of `--steps`
after a warm-up step); peak memory is CUDA's allocator peak, or on CPU the resident-set growth
measured right after the forward pass. `--flops` also prints training FLOPs per audio second of
every preset (counted from layer shapes), which the recipe README turns into GPU-hour estimates.

Last line: `train ctc=<a> las=<b> audio_s_per_s packed_vs_padded=<r>x`
"""

from __future__ import annotations

import argparse
import multiprocessing
import resource
import time
from pathlib import Path

import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from asr.models import build_model, model_config
from asr.models.base import ModelOutput
from asr.models.ctc import ctc_loss
from asr.models.subsampling import Subsampling
from asr.training.config import PRESETS as TRAIN_PRESETS

# Hours of training audio of the LibriSpeech recipes' presets (train-clean-100; all 960 h).
TRAIN_HOURS = {"librispeech-100h": 100.6, "librispeech-960h": 961.0}

FRAMES_PER_SECOND = 100
TOKENS_PER_SECOND = 4


class PackedBiLSTMCTC(nn.Module):
    """The peer: the same layer sizes as cpu-small BiLSTM-CTC (offline), with PyTorch's fused
    bidirectional LSTM over a PackedSequence, the textbook way to feed variable lengths."""

    def __init__(self, config: dict[str, int | str | float]) -> None:
        super().__init__()
        dim = int(config["projection_size"]) or 2 * int(config["hidden_size"])
        self.subsampling = Subsampling("conv2d", 80, dim, int(config["subsampling_channels"]))
        self.layers = nn.ModuleList(
            nn.LSTM(dim, int(config["hidden_size"]), batch_first=True, bidirectional=True)
            for _ in range(int(config["num_layers"]))
        )
        self.proj = nn.ModuleList(
            nn.Linear(2 * int(config["hidden_size"]), dim) for _ in range(int(config["num_layers"]))
        )
        self.head = nn.Linear(dim, int(config["vocab_size"]))

    def forward(
        self,
        feats: torch.Tensor,
        lens: torch.Tensor,
        targets: torch.Tensor,
        target_lens: torch.Tensor,
    ) -> ModelOutput:
        x, out_lens = self.subsampling(feats, lens)
        for lstm, proj in zip(self.layers, self.proj, strict=True):
            packed = pack_padded_sequence(x, out_lens.cpu(), batch_first=True, enforce_sorted=False)
            y, _ = lstm(packed)
            x = proj(pad_packed_sequence(y, batch_first=True, total_length=x.shape[1])[0])
        log_probs = self.head(x).float().log_softmax(-1)
        loss = ctc_loss(log_probs, out_lens, targets, target_lens)  # the loss ours trains with
        return ModelOutput(loss=loss, log_probs=log_probs, out_lens=out_lens)


def _batch(
    batch: int, seconds: float, vocab: int, device: torch.device
) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(0)
    frames = int(seconds * FRAMES_PER_SECOND)
    # Bucketed lengths: within 10 % of the longest, as the sampler produces.
    lens = torch.randint(int(frames * 0.9), frames + 1, (batch,), generator=gen)
    lens[0] = frames
    feats = torch.randn(batch, frames, 80, generator=gen)
    units = int(seconds * TOKENS_PER_SECOND)
    targets = torch.randint(3, vocab, (batch, units), generator=gen)
    target_lens = torch.full((batch,), units)
    return tuple(t.to(device) for t in (feats, lens, targets, target_lens))


def _memory_bytes(device: torch.device) -> int:
    """CUDA: the allocator's peak. CPU: the process's resident set now (sampled right after
    the forward pass, when the activations kept for backward are all alive)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return int(Path("/proc/self/statm").read_text().split()[1]) * resource.getpagesize()


VOCAB = 128  # cpu-small's units in the synthetic recipe are characters; the others keep theirs


def _vocab(kind: str, preset: str) -> int:
    return VOCAB if preset == "cpu-small" else int(model_config(kind, preset).vocab_size)


def _device_name(args: argparse.Namespace) -> str:
    if args.device.startswith("cuda"):
        return f"{torch.cuda.get_device_name(torch.device(args.device))}, {args.precision}"
    return f"cpu, {torch.get_num_threads()} threads, fp32"


def _make(variant: str, preset: str) -> tuple[nn.Module, int]:
    """The variant's model and its vocabulary size."""
    offline = {"chunk_size": 0, "right_context": 0}
    configs = {
        "ctc": ("ctc", {}),
        "las": ("las", {}),
        "ctc-offline": ("ctc", offline),
    }
    if variant == "ctc-offline-packed":
        vocab = _vocab("ctc", preset)
        config = model_config("ctc", preset, vocab_size=vocab, **offline)
        return PackedBiLSTMCTC(config.to_dict()), vocab
    kind, overrides = configs[variant]
    vocab = _vocab(kind, preset)
    config = model_config(kind, preset, vocab_size=vocab, **overrides)
    return build_model(kind, config.to_dict()), vocab


def measure(variant: str, args: argparse.Namespace) -> tuple[float, float, float]:
    """(audio s per s, peak memory MB, training GFLOP per audio second) of one variant.

    Runs in a fresh process (see main) so the CPU peak-RSS figure is this variant's alone.
    """
    device = torch.device(args.device)
    before = _memory_bytes(device)
    model, vocab = _make(variant, args.preset)
    model = model.to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    data = _batch(args.batch, args.seconds, vocab, device)
    audio = float(data[1].sum()) / FRAMES_PER_SECOND
    # As the trainer runs a step: autocast on CUDA, and fp16 with a gradient scaler.
    amp = device.type == "cuda" and args.precision != "fp32"
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.precision)
    scaler = torch.amp.GradScaler("cuda", enabled=amp and dtype == torch.float16)

    peak = 0

    def step() -> None:
        nonlocal peak
        with torch.autocast(device.type, dtype=dtype, enabled=amp):
            out = model(*data)
        assert out.loss is not None
        peak = max(peak, _memory_bytes(device))
        scaler.scale(out.loss).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)

    step()  # warm-up
    flops = training_flops(model, data) / audio
    best = float("inf")
    for _ in range(args.steps):
        start = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    used = (peak - (0 if device.type == "cuda" else before)) / 2**20
    return audio / best, used, flops / 1e9


def training_flops(model: nn.Module, data: tuple[torch.Tensor, ...]) -> float:
    """Forward + backward FLOPs of one step, counted from the shapes each layer processes.

    torch's FlopCounterMode misses the fused CPU LSTM kernels, so count matrix products by
    hand: an LSTM/LSTMCell step is 2 * 4H * (D + H) multiply-adds per row, a Linear 2 * in * out,
    a Conv2d 2 * C_in * k * k per output element; backward costs about twice the forward.
    """
    forward = 0.0

    def lstm_hook(module: nn.Module, args: tuple[torch.Tensor, ...], _out: object) -> None:
        nonlocal forward
        assert isinstance(module, nn.LSTM | nn.LSTMCell)
        x = args[0]
        if isinstance(x, PackedSequence):  # the peer: rows are the real (unpadded) frames
            rows = x.data.shape[0]
        else:
            rows = x.shape[0] * x.shape[1] if x.dim() == 3 else x.shape[0]
        hidden, inputs = int(module.hidden_size), int(module.input_size)
        forward += 2 * 4 * hidden * (inputs + hidden) * rows

    def linear_hook(module: nn.Module, args: tuple[torch.Tensor, ...], _out: object) -> None:
        nonlocal forward
        assert isinstance(module, nn.Linear)
        forward += (
            2 * module.in_features * module.out_features * args[0].numel() / module.in_features
        )

    def conv_hook(module: nn.Module, _args: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        nonlocal forward
        assert isinstance(module, nn.Conv2d)
        k = module.kernel_size[0] * module.kernel_size[1]
        forward += 2 * module.in_channels * k * out.numel()

    hooks = []
    for module in model.modules():
        if isinstance(module, nn.LSTM | nn.LSTMCell):
            hooks.append(module.register_forward_hook(lstm_hook))
        elif isinstance(module, nn.Linear):
            hooks.append(module.register_forward_hook(linear_hook))
        elif isinstance(module, nn.Conv2d):
            hooks.append(module.register_forward_hook(conv_hook))
    with torch.no_grad():
        model(*data)
    for hook in hooks:
        hook.remove()
    return 3 * forward


def preset_flops(seconds: float = 8.0) -> dict[tuple[str, str], float]:
    """Training GFLOP per audio second of every preset (a 1-utterance step, nothing run
    backward: the count is from shapes)."""
    out = {}
    frames = int(seconds * FRAMES_PER_SECOND)
    units = int(seconds * TOKENS_PER_SECOND)
    for kind in ("ctc", "las"):
        for preset in ("cpu-small", "librispeech-100h", "librispeech-960h"):
            config = model_config(kind, preset)
            model = build_model(kind, config.to_dict()).train()
            data = (
                torch.randn(1, frames, 80),
                torch.tensor([frames]),
                torch.randint(3, config.vocab_size, (1, units)),
                torch.tensor([units]),
            )
            out[(kind, preset)] = training_flops(model, data) / seconds / 1e9
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description="training throughput of a preset's models")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--preset", default="cpu-small", choices=sorted(TRAIN_PRESETS))
    parser.add_argument("--precision", default="bf16", choices=("fp32", "bf16", "fp16"))
    parser.add_argument(
        "--flops", action="store_true", help="also count training FLOPs of every preset"
    )
    args = parser.parse_args()
    if args.flops:
        print("training GFLOP per audio second (forward + backward):")
        for (kind, preset), gflop in preset_flops().items():
            print(f"  {kind} {preset:18s} {gflop:8.1f}")
    print(
        f"{args.preset}: {args.batch} x ~{args.seconds:.0f} s utterances, "
        f"{TOKENS_PER_SECOND} tokens/s, {_device_name(args)}, best of {args.steps} steps"
    )
    labels = {
        "ctc": f"ctc {args.preset} (LC)",
        "las": f"las {args.preset}",
        "ctc-offline": "ctc offline, padded+reversal (ours)",
        "ctc-offline-packed": "ctc offline, packed nn.LSTM (peer)",
    }
    results = {}
    spawn = multiprocessing.get_context("spawn")
    for variant in labels:
        with spawn.Pool(1) as pool:  # a fresh process per variant: clean memory peaks
            results[variant] = pool.apply(measure, (variant, args))
    rows = [(labels[v], results[v]) for v in labels]
    padded, packed = results["ctc-offline"], results["ctc-offline-packed"]
    print(f"{'model':40s} {'audio s/s':>10s} {'peak MB':>8s} {'GFLOP/audio s':>14s}")
    for label, (speed, peak, gflop) in rows:
        print(f"{label:40s} {speed:10.1f} {peak:8.0f} {gflop:14.2f}")
    ratio = padded[0] / packed[0]
    print(f"padded vs packed (ours / peer): {ratio:.2f}x")
    if args.preset in TRAIN_HOURS:
        cfg = TRAIN_PRESETS[args.preset]
        audio_hours = TRAIN_HOURS[args.preset] * cfg.epochs
        for kind in ("ctc", "las"):
            hours = audio_hours / results[kind][0]
            print(
                f"recipe estimate, {kind}: {TRAIN_HOURS[args.preset]} h x {cfg.epochs} epochs "
                f"at {results[kind][0]:.1f} audio s/s = {hours:.1f} device-hours on one such device"
            )
    print(
        f"train ctc={results['ctc'][0]:.1f} las={results['las'][0]:.1f} audio_s_per_s "
        f"packed_vs_padded={ratio:.2f}x"
    )


if __name__ == "__main__":
    main()
