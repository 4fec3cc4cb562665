"""Training throughput of the cpu-small presets, and our padded-with-reversal BiLSTM input
against PyTorch's packed-sequence bidirectional LSTM (the peer), in the same run.

    python bench/train_throughput.py [--steps 6] [--batch 8] [--seconds 8] [--device cpu]

Each measurement is a full training step (forward, CTC/attention loss, backward, AdamW) on
random features shaped like a bucketed batch: `--batch` utterances of about `--seconds` s with
4 subword targets per second. Throughput is audio seconds per wall second (best of `--steps`
after a warm-up step); peak memory is CUDA's allocator peak, or on CPU the growth of the
process's peak RSS during the measurement. Also prints training FLOPs per audio second (torch's
FLOP counter), which the recipe README turns into GPU-hour estimates.

Last line: `train ctc=<a> las=<b> audio_s_per_s packed_vs_padded=<r>x`
"""

from __future__ import annotations

import argparse
import multiprocessing
import resource
import time

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence
from torch.utils.flop_counter import FlopCounterMode

from asr.models import build_model, model_config
from asr.models.base import ModelOutput
from asr.models.subsampling import Subsampling

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
        loss = nn.functional.ctc_loss(
            log_probs.transpose(0, 1),
            targets.clamp(min=0),
            out_lens,
            target_lens,
            zero_infinity=True,
        )
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


def _peak_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


VOCAB = 128


def _make(variant: str) -> nn.Module:
    offline = {"chunk_size": 0, "right_context": 0}
    configs = {
        "ctc": ("ctc", {}),
        "las": ("las", {}),
        "ctc-offline": ("ctc", offline),
    }
    if variant == "ctc-offline-packed":
        return PackedBiLSTMCTC(
            model_config("ctc", "cpu-small", vocab_size=VOCAB, **offline).to_dict()
        )
    kind, overrides = configs[variant]
    return build_model(
        kind, model_config(kind, "cpu-small", vocab_size=VOCAB, **overrides).to_dict()
    )


def measure(variant: str, args: argparse.Namespace) -> tuple[float, float, float]:
    """(audio s per s, peak memory MB, training GFLOP per audio second) of one variant.

    Runs in a fresh process (see main) so the CPU peak-RSS figure is this variant's alone.
    """
    device, vocab = torch.device(args.device), VOCAB
    before = _peak_bytes(device)
    model = _make(variant).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    data = _batch(args.batch, args.seconds, vocab, device)
    audio = float(data[1].sum()) / FRAMES_PER_SECOND

    def step() -> None:
        out = model(*data)
        assert out.loss is not None
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    with FlopCounterMode(display=False) as counter:
        step()  # warm-up, counted once
    flops = counter.get_total_flops() / audio
    best = float("inf")
    for _ in range(args.steps):
        start = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    peak = (_peak_bytes(device) - (0 if device.type == "cuda" else before)) / 2**20
    return audio / best, peak, flops / 1e9


def preset_flops(seconds: float = 4.0) -> dict[tuple[str, str], float]:
    """Training GFLOP per audio second of every preset (one 1-utterance step, CPU)."""
    out = {}
    frames = int(seconds * FRAMES_PER_SECOND)
    units = int(seconds * TOKENS_PER_SECOND)
    for kind in ("ctc", "las"):
        for preset in ("cpu-small", "librispeech-100h", "librispeech-960h"):
            model = build_model(kind, model_config(kind, preset).to_dict()).train()
            vocab = model_config(kind, preset).vocab_size
            data = (
                torch.randn(1, frames, 80),
                torch.tensor([frames]),
                torch.randint(3, vocab, (1, units)),
                torch.tensor([units]),
            )
            with FlopCounterMode(display=False) as counter:
                loss = model(*data).loss
                assert loss is not None
                loss.backward()
            out[(kind, preset)] = counter.get_total_flops() / seconds / 1e9
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description="training throughput, cpu-small presets")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--flops", action="store_true", help="also count training FLOPs of every preset"
    )
    args = parser.parse_args()
    if args.flops:
        print("training GFLOP per audio second (forward + backward):")
        for (kind, preset), gflop in preset_flops().items():
            print(f"  {kind} {preset:18s} {gflop:8.1f}")
    print(
        f"{args.batch} x ~{args.seconds:.0f} s utterances, {TOKENS_PER_SECOND} tokens/s, "
        f"{args.device}, {torch.get_num_threads()} threads, best of {args.steps} steps"
    )
    labels = {
        "ctc": "ctc cpu-small (LC 16/8)",
        "las": "las cpu-small",
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
    print(
        f"train ctc={results['ctc'][0]:.1f} las={results['las'][0]:.1f} audio_s_per_s "
        f"packed_vs_padded={ratio:.2f}x"
    )


if __name__ == "__main__":
    main()
