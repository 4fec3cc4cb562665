"""The `asr transcribe` command: its arguments, and a run from inputs to outputs."""

from __future__ import annotations

import argparse
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from asr import load_model
from asr.audio import AudioError
from asr.recognizer import BATCH_FRAMES
from asr.transcribe.engines import Engine, LocalEngine, ServerEngine, run_engine
from asr.transcribe.inputs import Item, collect, parse_shard, probe, shard
from asr.transcribe.progress import Progress
from asr.transcribe.results import Failure, FileResult
from asr.transcribe.writers import FORMATS, open_output

if TYPE_CHECKING:
    from asr.client import AsrClient

LONG_AUDIO = 60.0  # seconds; longer files are read in blocks and segmented


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "paths",
        nargs="+",
        metavar="PATH",
        help="audio files, directories (searched recursively), JSONL manifests, or - for a "
        "list of paths on stdin",
    )
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--model", type=Path, metavar="BUNDLE", help="bundle directory to decode with"
    )
    source.add_argument("--server", metavar="HOST:PORT", help="transcribe with a running server")
    p.add_argument("--format", choices=FORMATS, help="default: --out's extension, else txt")
    p.add_argument(
        "--out",  # a str: Path would drop the trailing / that asks for a directory
        metavar="FILE|DIR/",
        help="output file (appended to and resumed for txt/jsonl), or DIR/ for one file per "
        "input; default stdout",
    )
    p.add_argument("--shard", metavar="I/N", help="transcribe only shard I (0-based) of N")
    p.add_argument("--workers", type=int, default=2, help="threads reading audio (or calls)")
    p.add_argument(
        "--batch-seconds",
        type=float,
        default=BATCH_FRAMES / 100,
        help="padded audio per decoded batch (memory grows with it)",
    )
    p.add_argument("--nbest", type=int, default=1, help="alternatives in jsonl output")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    p.add_argument(
        "--long-audio",
        type=float,
        default=LONG_AUDIO,
        metavar="SECONDS",
        help="files longer than this are read in blocks and segmented",
    )
    p.add_argument(
        "--max-segment", type=float, default=30.0, help="longest segment of a long file (s)"
    )
    p.add_argument("--cue-words", type=int, default=12, help="most words in a subtitle cue")
    p.add_argument("--model-name", default="", help="with --server: the model to use")
    p.add_argument("--token-file", type=Path, help="with --server: bearer token file")
    p.add_argument("--tls", action="store_true", help="with --server: connect over TLS")
    p.add_argument("--tls-ca", type=Path, help="with --server: TLS trusting this PEM CA bundle")
    p.add_argument("--quiet", action="store_true", help="no progress bar or summary")


def _engine(args: argparse.Namespace, overrides: dict[str, Any]) -> tuple[Engine, AsrClient | None]:
    """The engine, and the client to close when done."""
    if args.server is not None:
        from asr.client import connect

        if overrides or args.rescore_model or args.lm or args.quantize != "none":
            raise ValueError("with --server, decoding options are the server's")
        # No deadline: a long file streams for as long as it lasts.
        client = connect(
            args.server,
            token_file=args.token_file,
            tls=args.tls,
            tls_ca=args.tls_ca,
            timeout=None,
        )
        remote = ServerEngine(client, model=args.model_name, nbest=args.nbest, workers=args.workers)
        return remote, client
    try:
        recognizer = load_model(
            args.model,
            args.device,
            rescorer=args.rescore_model,
            lm=args.lm,
            quantize=args.quantize,
            **overrides | {"nbest": args.nbest},
        )
    except TypeError as err:  # an unknown option name: a bad argument
        raise ValueError(str(err)) from err
    local = LocalEngine(
        recognizer,
        workers=args.workers,
        max_segment=args.max_segment,
        batch_frames=max(1, round(args.batch_seconds * 100)),
    )
    return local, None


def run(args: argparse.Namespace, overrides: dict[str, Any] | None = None) -> int:
    """`asr transcribe`; `overrides` are DecodeOptions fields (--method, --beam, --set, ...:
    the decoding flags `asr.cli` adds to this command as to `asr decode`)."""
    index, count = parse_shard(args.shard)
    suffix = "" if args.out is None else Path(args.out).suffix[1:]
    fmt = args.format or (suffix if suffix in FORMATS else "txt")
    for name in ("workers", "nbest", "cue_words"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    engine, client = _engine(args, overrides or {})
    items = shard(collect(args.paths, sys.stdin), index, count)
    quiet = args.quiet
    progress = Progress(0.0, enabled=not quiet and sys.stderr.isatty())
    output = open_output(
        fmt, args.out, items, cue_words=args.cue_words, nbest=args.nbest > 1, log=progress.log
    )
    done = output.finished(items)
    todo = [i for i in items if i.id not in done]
    try:
        probed = _probe_all(todo, args.workers, progress)
        progress.bar.reset(total=sum(i.duration or 0.0 for i in probed))
        for outcome in run_engine(engine, probed, args.long_audio, progress.advance):
            progress.done(outcome)
            if isinstance(outcome, FileResult):
                output.write(outcome)
        output.close()
    finally:
        progress.close()
        if client is not None:
            client.close()
        if not quiet:
            print(progress.summary(len(done)), file=sys.stderr)
    return 1 if progress.failed else 0


def _probe_all(items: list[Item], workers: int, progress: Progress) -> list[Item]:
    """Items with durations; files whose header cannot be read are reported as failures."""

    def attempt(item: Item) -> Item | Failure:
        try:
            return probe(item)
        except AudioError as err:
            return Failure(item, err.reason)

    with ThreadPoolExecutor(max(1, workers)) as pool:
        probed = list(pool.map(attempt, items))
    for outcome in probed:
        if isinstance(outcome, Failure):
            progress.done(outcome)
    return [i for i in probed if isinstance(i, Item)]
