"""The `asr` command. Each subcommand is one entry in `COMMANDS`: its arguments and its action.

Errors a user can cause (bad paths, bad audio, bad manifests, bad options) end with one line on
stderr naming the input and exit status 2; partial failures (some files bad) exit 1.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from asr.data import synth
from asr.data.dataset import manifest_cmvn
from asr.data.librispeech import prepare
from asr.data.manifest import read_manifest
from asr.features import FeatureConfig
from asr.text import normalize_text
from asr.tokenizer import KINDS, Tokenizer


def _default_jobs() -> int:
    return len(os.sched_getaffinity(0))


def _add_prepare(p: argparse.ArgumentParser) -> None:
    p.add_argument("--librispeech-root", required=True, type=Path, help="directory with subsets")
    p.add_argument(
        "--subsets",
        required=True,
        help="comma-separated, e.g. dev-clean,test-clean,train-clean-100",
    )
    p.add_argument("--out", required=True, type=Path, help="where <subset>.jsonl files go")
    p.add_argument("--jobs", type=int, default=_default_jobs(), help="parallel decoders")
    p.add_argument(
        "--no-verify",
        action="store_true",
        help="read durations from headers instead of decoding every file (faster, but a "
        "truncated file is only found at training time)",
    )


def _run_prepare(args: argparse.Namespace) -> int:
    subsets = [s for s in args.subsets.split(",") if s]
    reports = prepare(
        args.librispeech_root,
        subsets,
        args.out,
        verify=not args.no_verify,
        jobs=args.jobs,
        progress=sys.stderr.isatty(),
    )
    for report in reports:
        print(report.summary())
        for problem in report.problems:
            print(f"  {problem}")
        if report.problems:
            print(f"  (listed in {args.out / (report.subset + '.problems.txt')})")
    return 1 if any(r.problems for r in reports) else 0


def _add_tokenizer(p: argparse.ArgumentParser) -> None:
    p.add_argument("--manifest", required=True, action="append", type=Path, help="repeatable")
    p.add_argument("--kind", choices=KINDS, default="unigram")
    p.add_argument("--vocab-size", type=int, default=256)
    p.add_argument("--out", required=True, type=Path, help="tokenizer .model file to write")


def _run_tokenizer(args: argparse.Namespace) -> int:
    texts = [normalize_text(u.text) for m in args.manifest for u in read_manifest(m)]
    tokenizer = Tokenizer.train(texts, args.kind, args.vocab_size)
    bad = sum(tokenizer.decode(tokenizer.encode(t)) != t for t in texts)
    if bad:  # identity normalisation should make this impossible; never ship a lossy tokenizer
        raise ValueError(f"tokenizer does not round-trip {bad} of {len(texts)} sentences")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tokenizer.save(args.out)
    tokens = sum(len(tokenizer.encode(t)) for t in texts)
    print(
        f"{args.out}: {tokenizer.kind} tokenizer, {tokenizer.vocab_size} units, "
        f"{tokens / max(len(texts), 1):.1f} tokens per sentence over {len(texts)} sentences"
    )
    return 0


def _add_cmvn(p: argparse.ArgumentParser) -> None:
    p.add_argument("--manifest", required=True, type=Path, help="training manifest")
    p.add_argument("--out", required=True, type=Path, help="cmvn.json to write")
    p.add_argument("--max-utterances", type=int, default=20_000)
    p.add_argument("--jobs", type=int, default=_default_jobs())


def _run_cmvn(args: argparse.Namespace) -> int:
    utterances = read_manifest(args.manifest)
    workers = args.jobs if args.jobs > 1 else 0
    cmvn = manifest_cmvn(
        utterances, FeatureConfig(), max_utterances=args.max_utterances, workers=workers
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    cmvn.save(args.out)
    print(f"{args.out}: CMVN over {cmvn.frames} frames ({cmvn.frames / 360000:.2f} h)")
    return 0


@dataclass(frozen=True)
class Command:
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


COMMANDS: dict[str, Command] = {
    "prepare": Command("LibriSpeech-layout corpus -> JSONL manifests", _add_prepare, _run_prepare),
    "synth": Command(
        "synthesize a LibriSpeech-layout corpus with TTS voices", synth.add_arguments, synth.run
    ),
    "tokenizer": Command(
        "train a sentencepiece tokenizer on manifest text", _add_tokenizer, _run_tokenizer
    ),
    "cmvn": Command("global CMVN statistics over a manifest", _add_cmvn, _run_cmvn),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="asr", description="Speech recognition toolkit: data, training, decoding, serving."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, command in COMMANDS.items():
        command.add_arguments(sub.add_parser(name, help=command.help, description=command.help))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command].run(args)
    except (OSError, ValueError) as err:  # AudioError, ManifestError, bad configs, missing files
        print(f"asr {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"asr {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
