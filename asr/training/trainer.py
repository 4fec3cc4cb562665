"""One training loop for every model: AMP, DDP (torchrun), accumulation, validation, checkpoints.

Run under `torchrun --nproc_per_node=N` for data parallelism (NCCL on GPUs, gloo on CPU); a plain
process trains alone. Exact resume: a checkpoint holds model, optimizer, scheduler, grad scaler,
sampler position and every rank's RNG state, and the data of each step is a pure function of
(seed, epoch, step), so a resumed run repeats the uninterrupted run's losses step for step.
"""

from __future__ import annotations

import json
import math
import os
import random
import signal
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any, Protocol, cast

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from asr.config import Config
from asr.data.dataset import SpeechDataset, collate
from asr.data.manifest import read_manifest
from asr.data.sampler import BucketingBatchSampler
from asr.evaluation import evaluate
from asr.features import CMVN, SPEED_FACTORS, FeatureConfig
from asr.models import build_model, config_class, count_parameters
from asr.models.base import ModelOutput, attach_cmvn
from asr.tokenizer import Tokenizer
from asr.training import checkpoint as ckpt
from asr.training.config import TrainConfig

_AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
_WINDOW_KEYS = {"loss", "utts", "audio", "batches", "start"}  # the loop's own counters


class TrainingSet(Protocol):
    """What the loop needs of a training set (speech or text): indexable, sized, and told the
    epoch so its per-example randomness follows (seed, epoch, example)."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> Any: ...

    def set_epoch(self, epoch: int) -> None: ...


class TrainingInterrupted(RuntimeError):
    """SIGTERM/SIGINT arrived; a checkpoint was written and the run can be resumed."""


@dataclass(frozen=True)
class Experiment:
    """Everything that defines a run; saved as `exp_dir/experiment.json` and in checkpoints."""

    model_type: str
    model_config: dict[str, Any]
    train: TrainConfig
    train_manifest: str
    dev_manifest: str
    feature_config: FeatureConfig = field(default_factory=FeatureConfig)
    preset: str = ""
    init: str = ""  # weights the run started from (fine-tuning): a bundle or checkpoint path

    def to_dict(self) -> dict[str, Any]:
        return {
            # "init" only when set, so experiments written before it existed still resume
            "model": {"type": self.model_type, "preset": self.preset, "config": self.model_config}
            | ({"init": self.init} if self.init else {}),
            "train": self.train.to_dict(),
            "data": {"train": self.train_manifest, "dev": self.dev_manifest},
            "features": asdict(self.feature_config),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Experiment:
        return cls(
            model_type=data["model"]["type"],
            model_config=data["model"]["config"],
            train=TrainConfig.from_dict(data["train"]),
            train_manifest=data["data"]["train"],
            dev_manifest=data["data"]["dev"],
            feature_config=FeatureConfig.from_dict(data["features"]),
            preset=data["model"].get("preset", ""),
            init=data["model"].get("init", ""),
        )


@dataclass
class _Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def _init_distributed(device_type: str) -> _Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return _Dist()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
    return _Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def _any(flag: bool, d: _Dist, device: torch.device) -> bool:
    """True on every rank if `flag` is true on any rank (keeps ranks in lockstep)."""
    if not d.enabled:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


class _StopSignal:
    """Turns SIGTERM/SIGINT into a flag the loop polls at step boundaries (a checkpoint written
    mid-step would hold half-updated state)."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _StopSignal:
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.requested = True

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _lr_lambda(warmup: int, total: int, min_ratio: float) -> Any:
    """Linear warmup to the peak, then cosine decay to `min_ratio` of it at `total` steps."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


class Trainer:
    """Trains one experiment in `exp_dir`; resumes from its newest checkpoint if there is one."""

    def __init__(
        self,
        exp_dir: str | Path,
        experiment: Experiment,
        tokenizer_path: str | Path,
        cmvn_path: str | Path | None,
        *,
        device: str | None = None,
        progress: bool = True,
    ) -> None:
        self.exp_dir = Path(exp_dir)
        self.exp = experiment
        self.cfg = experiment.train
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        device_type = torch.device(device).type
        self.dist = _init_distributed(device_type)
        if device_type == "cuda":
            torch.cuda.set_device(self.dist.local_rank)
            self.device = torch.device("cuda", self.dist.local_rank)
        else:
            self.device = torch.device("cpu")
        self.progress = progress and self.dist.main
        self.tokenizer = Tokenizer.load(tokenizer_path)
        # A language model has no features to normalise, so no statistics.
        self.cmvn = None if cmvn_path is None else CMVN.load(cmvn_path)
        stats_of = None if self.cmvn is None else self.cmvn.features
        if stats_of is not None and stats_of != experiment.feature_config:
            raise ValueError(
                f"{cmvn_path}: statistics of features {stats_of.to_dict()}, but the run "
                f"computes {experiment.feature_config.to_dict()}"
            )
        if self.dist.main:
            self._write_experiment()

        torch.manual_seed(self.cfg.seed + self.dist.rank)  # model init identical: broadcast by DDP
        random.seed(self.cfg.seed + self.dist.rank)
        self.model = self._build_model().to(self.device)
        if self.cmvn is not None:
            attach_cmvn(self.model, self.cmvn)  # the model normalises its input
        self.ddp: nn.Module = (
            DistributedDataParallel(
                self.model, device_ids=[self.dist.local_rank] if device_type == "cuda" else None
            )
            if self.dist.enabled
            else self.model
        )
        self.train_set, lengths = self._training_data()
        self.sampler = BucketingBatchSampler(
            lengths,
            max_frames=self.cfg.max_frames,
            num_buckets=self.cfg.num_buckets,
            max_batch_size=self.cfg.max_batch_size,
            seed=self.cfg.seed,
            rank=self.dist.rank,
            world_size=self.dist.world,
        )
        if self.sampler.excluded and self.dist.main:
            print(
                f"warning: {len(self.sampler.excluded)} training {self.unit}s are longer than "
                f"max_frames={self.cfg.max_frames} and are skipped"
            )
        params = self.model.parameters()
        opt_cls = torch.optim.AdamW if self.cfg.optimizer == "adamw" else torch.optim.Adam
        self.optimizer = opt_cls(params, lr=self.cfg.lr, weight_decay=self.cfg.weight_decay)
        steps_per_epoch = max(1, len(self.sampler) // self.cfg.accum_steps)
        self.total_steps = steps_per_epoch * self.cfg.epochs
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer,
            _lr_lambda(self.cfg.warmup_steps, self.total_steps, self.cfg.min_lr_ratio),
        )
        use_amp = device_type == "cuda" and self.cfg.precision != "fp32"
        self.amp_dtype = _AMP_DTYPES.get(self.cfg.precision) if use_amp else None
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)
        self.step = 0
        self.epoch = 0
        self.batches_done = 0  # of the current epoch, on this rank
        self.skipped_batches = 0
        self.train_seconds = 0.0  # wall time spent in training, summed over resumed runs
        self._started = time.time()
        self.history: list[dict[str, Any]] = []
        self._writer: Any = None  # a SummaryWriter once the first record is logged

    # ------------------------------------------------------------------- data
    # What a kind of training (speech here, text in asr.training.lm) supplies to the loop.

    unit = "utterance"  # what one training example is, for messages
    throughput = "audio_s_per_s"  # the logged rate of `_amount` per second

    def _build_model(self) -> nn.Module:
        return build_model(self.exp.model_type, self.exp.model_config)

    def _model_config(self, config: Mapping[str, Any]) -> Config:
        """The model's config rebuilt from `to_dict` (or JSON) output."""
        return config_class(self.exp.model_type).from_dict(config)

    def _training_data(self) -> tuple[TrainingSet, Sequence[int]]:
        """The training set and each example's length for the sampler's batch budget."""
        self.train_utts = read_manifest(self.exp.train_manifest)
        self.dev_utts = read_manifest(self.exp.dev_manifest)
        train_set = SpeechDataset(
            self.train_utts,
            self.tokenizer,
            self.exp.feature_config,
            cmvn=self.cmvn,
            train=True,
            speed_factors=SPEED_FACTORS if self.cfg.speed_perturb else (1.0,),
            spec_augment=self.cfg.spec_augment,
            augment=self.cfg.augment,
            seed=self.cfg.seed,
        )
        return train_set, train_set.num_frames

    def _collate(self, examples: Sequence[Any]) -> Any:
        return collate(examples)

    def _amount(self, batch: Any) -> float:
        """What `throughput` counts in one batch: seconds of audio."""
        return float(batch.feat_lens.sum()) * self.exp.feature_config.hop_ms / 1e3

    def _epoch_summary(self, result: dict[str, float]) -> str:
        return (
            f"valid loss {result['valid_loss']:.3f}, "
            f"WER {result['wer']:.2f} %, CER {result['cer']:.2f} %"
        )

    # ------------------------------------------------------------------ files

    def _same_experiment(self, old: dict[str, Any], new: dict[str, Any]) -> bool:
        """Whether experiment.json `old` (as read back) describes the run `new`: the same
        model, features and data. Configs are compared as configs, not dicts, so an experiment
        written before a config field existed resumes with that field at its default, and a
        tuple read back as a list is the same tuple."""
        others = [{k: v for k, v in d["model"].items() if k != "config"} for d in (old, new)]
        if old["data"] != new["data"] or others[0] != others[1]:  # type, preset, init
            return False
        try:
            features = [FeatureConfig.from_dict(d["features"]) for d in (old, new)]
            return features[0] == features[1] and (
                self._model_config(old["model"]["config"])
                == self._model_config(new["model"]["config"])
            )
        except ValueError:  # a field this version does not have
            return False

    def _write_experiment(self) -> None:
        self.exp_dir.mkdir(parents=True, exist_ok=True)
        # Copies travel with the experiment, so export never depends on data/ still existing.
        self.tokenizer.save(self.exp_dir / "tokenizer.model")
        if self.cmvn is not None:
            self.cmvn.save(self.exp_dir / "cmvn.json")
        path = self.exp_dir / "experiment.json"
        data = self.exp.to_dict()
        if path.exists():
            old = json.loads(path.read_text())
            if not self._same_experiment(old, data):
                raise ValueError(
                    f"{self.exp_dir} holds a different experiment (model, features or data "
                    "differ); use a new --exp-dir"
                )
        path.write_text(json.dumps(data, indent=2) + "\n")

    def _log(self, record: dict[str, Any]) -> None:
        if not self.dist.main:
            return
        record = {"time": round(time.time(), 3), **record}
        with (self.exp_dir / "metrics.jsonl").open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self._writer is None:
            # Imported here: tensorboard pulls in a large import graph that inference, the
            # server and the CLI's other commands never need.
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(str(self.exp_dir / "tensorboard"))
        for key, value in record.items():
            if isinstance(value, int | float) and key not in ("time", "step", "epoch"):
                self._writer.add_scalar(key, value, self.step)
        self._writer.flush()

    # ------------------------------------------------------------- checkpoints

    def _rng_state(self) -> dict[str, Any]:
        state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
        if self.device.type == "cuda":
            state["cuda"] = torch.cuda.get_rng_state(self.device)
        return state

    def _set_rng_state(self, state: dict[str, Any]) -> None:
        torch.set_rng_state(state["torch"])
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
        if "cuda" in state and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["cuda"], self.device)

    def save_checkpoint(self) -> Path | None:
        rng = self._rng_state()
        if self.dist.enabled:
            gathered: list[Any] = [None] * self.dist.world
            dist.all_gather_object(gathered, rng)
            rngs = gathered
        else:
            rngs = [rng]
        path = ckpt.checkpoint_path(self.exp_dir, self.step)
        if self.dist.main:
            state = {
                "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict(),
                "sampler": self.sampler.state_dict(self.batches_done),
                "rng": rngs,
                "step": self.step,
                "epoch": self.epoch,
                "skipped_batches": self.skipped_batches,
                "train_seconds": self.train_seconds + time.time() - self._started,
                "history": json.dumps(self.history),
                "experiment": json.dumps(self.exp.to_dict()),
            }
            ckpt.save_atomic(state, path)
            ckpt.rotate(self.exp_dir, self.cfg.keep_last)
        if self.dist.enabled:
            dist.barrier()
        return path if self.dist.main else None

    def _initialise(self, path: Path) -> None:
        """Start from another model's weights (fine-tuning): every tensor whose name and shape
        match; the rest keep their fresh initialisation. Only a run without checkpoints."""
        fresh = ckpt.transfer(self.model, ckpt.initial_weights(path))
        if self.dist.main:
            rest = f"; freshly initialised: {', '.join(fresh)}" if fresh else ""
            print(f"initialised from {path}{rest}")

    def resume(self) -> bool:
        """Load the newest checkpoint in exp_dir, if any."""
        found = ckpt.list_checkpoints(self.exp_dir)
        if not found:
            return False
        state = ckpt.load(found[-1], map_location=self.device)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.sampler.load_state_dict(state["sampler"])
        rngs = state["rng"]
        if len(rngs) != self.dist.world:
            raise ValueError(
                f"{found[-1]} was written by {len(rngs)} ranks; resume with the same number "
                f"(now {self.dist.world}) for an exact continuation"
            )
        self._set_rng_state(rngs[self.dist.rank])
        self.step = int(state["step"])
        self.epoch = int(state["epoch"])
        self.batches_done = self.sampler.start_batch
        self.skipped_batches = int(state["skipped_batches"])
        self.train_seconds = float(state.get("train_seconds", 0.0))
        self.history = json.loads(state["history"])
        if self.dist.main:
            print(f"resumed from {found[-1]} (epoch {self.epoch}, step {self.step})")
        return True

    # ------------------------------------------------------------------ steps

    def _autocast(self) -> AbstractContextManager[Any]:
        if self.amp_dtype is None:
            return nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def _loader(self, epoch: int) -> DataLoader[Any]:
        self.train_set.set_epoch(epoch)
        # A private generator: the DataLoader otherwise draws its worker seed from the global
        # RNG, which would shift dropout masks after a resume.
        return DataLoader(
            cast(Dataset[Any], self.train_set),
            batch_sampler=self.sampler,
            collate_fn=self._collate,
            num_workers=self.cfg.num_workers,
            pin_memory=self.device.type == "cuda",
            generator=torch.Generator().manual_seed(self.cfg.seed + epoch),
        )

    def _forward(self, batch: Any) -> ModelOutput:
        batch = batch.to(self.device, non_blocking=True)
        with self._autocast():
            out: ModelOutput = self.ddp(*batch.inputs())
        return out

    def _epoch_batches(self) -> Iterator[Any]:
        for batch in self._loader(self.epoch):
            self.batches_done += 1
            yield batch

    def train(self, max_steps: int | None = None) -> list[dict[str, Any]]:
        """Train to the configured number of epochs (or `max_steps` optimizer steps).

        Returns the per-epoch validation history. Raises `TrainingInterrupted` after
        checkpointing if SIGTERM/SIGINT arrives.
        """
        if not self.resume() and self.exp.init:
            self._initialise(Path(self.exp.init))
        self._started = time.time()
        if self.dist.main:
            print(
                f"{self.exp.model_type}: {count_parameters(self.model) / 1e6:.2f} M parameters, "
                f"{len(self.train_set)} training {self.unit}s, {self.dist.world} rank(s) on "
                f"{self.device.type}"
            )
        with _StopSignal() as stop:
            while self.epoch < self.cfg.epochs:
                if self.batches_done == 0:
                    self.sampler.set_epoch(self.epoch)
                if self._train_epoch(stop, max_steps):
                    return self.history
                self._end_epoch()
        return self.history

    def _train_epoch(self, stop: _StopSignal, max_steps: int | None) -> bool:
        """Returns True when training must stop early (max_steps reached)."""
        self.ddp.train()
        accum = self.cfg.accum_steps
        micro = 0
        window: dict[str, float] = {"loss": 0.0, "utts": 0, "audio": 0.0, "batches": 0}
        window["start"] = time.time()
        bar = tqdm(
            total=len(self.sampler) + self.batches_done,
            initial=self.batches_done,
            desc=f"epoch {self.epoch + 1}/{self.cfg.epochs}",
            disable=not self.progress,
            dynamic_ncols=True,
        )
        for batch in self._epoch_batches():
            bar.update(1)
            sync = (micro + 1) % accum == 0
            ctx = self.ddp.no_sync() if self.dist.enabled and not sync else nullcontext()  # type: ignore[operator]
            with ctx:
                out = self._forward(batch)
                assert out.loss is not None
                if _any(not bool(torch.isfinite(out.loss)), self.dist, self.device):
                    # A bad batch (e.g. a NaN from fp16 overflow) is dropped on every rank,
                    # together with any partial accumulation, instead of poisoning the weights.
                    self.skipped_batches += 1
                    self.optimizer.zero_grad(set_to_none=True)
                    micro = 0
                    continue
                self.scaler.scale(out.loss / accum).backward()
            micro += 1
            window["loss"] += float(out.loss.detach())
            window["utts"] += len(batch.ids)
            window["audio"] += self._amount(batch)
            window["batches"] += 1
            for key, value in out.metrics.items():  # the model's loss parts, e.g. att_acc
                window[key] = window.get(key, 0.0) + value
            if micro % accum:
                continue
            micro = 0
            self._optimizer_step()
            if self.step % self.cfg.log_every == 0 or self.step == 1:
                self._log_window(window, bar)
            if self.step % self.cfg.checkpoint_every == 0:
                self.save_checkpoint()
            if _any(stop.requested, self.dist, self.device):
                path = self.save_checkpoint()
                bar.close()
                raise TrainingInterrupted(
                    f"stopped at step {self.step}; checkpoint {path or 'written by rank 0'}; "
                    "rerun the same command to resume"
                )
            if max_steps is not None and self.step >= max_steps:
                bar.close()
                self.save_checkpoint()
                return True
        bar.close()
        return False

    def _optimizer_step(self) -> None:
        self.scaler.unscale_(self.optimizer)
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        if not torch.isfinite(norm) and not self.scaler.is_enabled():
            # fp16's GradScaler skips such steps itself; in fp32/bf16 we must.
            self.skipped_batches += 1
        else:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.step += 1

    def _log_window(self, window: dict[str, float], bar: tqdm) -> None:
        elapsed = max(time.time() - window["start"], 1e-9)
        batches = max(window["batches"], 1)
        parts = {k: v / batches for k, v in window.items() if k not in _WINDOW_KEYS}
        record = {
            "step": self.step,
            "epoch": self.epoch,
            "loss": window["loss"] / batches,
            "lr": self.scheduler.get_last_lr()[0],
            "utt_per_s": window["utts"] * self.dist.world / elapsed,
            self.throughput: window["audio"] * self.dist.world / elapsed,
            "skipped_batches": self.skipped_batches,
            **parts,
        }
        bar.set_postfix(
            loss=f"{record['loss']:.3f}",
            lr=f"{record['lr']:.2e}",
            utt_s=f"{record['utt_per_s']:.1f}",
        )
        self._log(record)
        window.clear()
        window.update(loss=0.0, utts=0, audio=0.0, batches=0, start=time.time())

    def _end_epoch(self) -> None:
        result = self.validate() if self.dist.main else {}
        if self.dist.enabled:
            dist.barrier()
        record = {"epoch": self.epoch + 1, "step": self.step, **result}
        self.history.append(record)
        self._log(record)
        if self.dist.main:
            print(f"epoch {self.epoch + 1}: {self._epoch_summary(result)}")
        self.epoch += 1
        self.batches_done = 0
        self.sampler.set_epoch(min(self.epoch, self.cfg.epochs - 1))
        self.save_checkpoint()

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        """Dev loss and greedy WER/CER (rank 0, unwrapped model)."""
        utts = self.dev_utts[: self.cfg.valid_max_utterances]
        result = evaluate(
            self.model,
            utts,
            self.tokenizer,
            self.exp.feature_config,
            self.device,
            max_frames=self.cfg.max_frames,
        )
        self.model.train()
        return result.summary()
