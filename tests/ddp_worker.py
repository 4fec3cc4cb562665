"""Run under `torchrun --nproc_per_node=N`: trains one epoch with DDP (NCCL on GPUs, gloo on
CPU) and writes what each rank saw (utterance ids, step count, a hash of its final weights) for
tests/test_training.py to compare."""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Iterator
from pathlib import Path

import torch.distributed as dist

from asr.data.dataset import Batch
from asr.training.trainer import Experiment, Trainer


class RecordingTrainer(Trainer):
    seen: list[str]

    def _epoch_batches(self) -> Iterator[Batch]:
        for batch in super()._epoch_batches():
            self.seen.extend(batch.ids)
            yield batch


def main() -> None:
    out, tokenizer, cmvn = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
    experiment = Experiment.from_dict(json.loads((out / "experiment.json").read_text()))
    trainer = RecordingTrainer(out / "exp", experiment, tokenizer, cmvn, progress=False)
    trainer.seen = []
    trainer.train()
    digest = hashlib.sha256()
    for name, tensor in sorted(trainer.model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().numpy().tobytes())
    rank = dist.get_rank()
    record = {
        "ids": trainer.seen,
        "steps": trainer.step,
        "backend": dist.get_backend(),
        "weights": digest.hexdigest(),
        "excluded": [trainer.train_utts[i].id for i in trainer.sampler.excluded],
    }
    (out / f"rank{rank}.json").write_text(json.dumps(record))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
