"""The `asr` command. Each subcommand is one entry in `COMMANDS`: its arguments and its action.

Errors a user can cause (bad paths, bad audio, bad manifests, bad options) end with one line on
stderr naming the input and exit status 2; partial failures (some files bad) exit 1.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from asr import load_model
from asr.data import synth
from asr.data.dataset import manifest_cmvn
from asr.data.librispeech import prepare
from asr.data.manifest import read_manifest
from asr.decoding.options import DEFAULT_BOOST
from asr.evaluation import (
    add_results,
    decode_line,
    score_decode,
    stream_manifest,
    transcribe_manifest,
    write_decode,
)
from asr.features import CMVN, DEFAULT_CMN_PRIOR, FeatureConfig
from asr.files import atomic_write
from asr.language_model import DEFAULT_LM_WEIGHT
from asr.models import MODELS, model_config
from asr.quantize import QUANTIZATIONS
from asr.text import normalize_text
from asr.tokenizer import KINDS, Tokenizer
from asr.training.config import PRESETS as TRAIN_PRESETS
from asr.training.config import TrainConfig
from asr.training.export import export_experiment
from asr.training.trainer import Experiment, Trainer, TrainingInterrupted


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
    p.add_argument(
        "--window",
        type=int,
        default=0,
        help="also subtract a causal sliding-window mean over this many frames (300 = 3 s), "
        "so channel and level matter less; 0: global CMVN only",
    )
    p.add_argument(
        "--prior-frames",
        type=int,
        default=DEFAULT_CMN_PRIOR,
        help="weight, in frames, of the global mean in the sliding window",
    )
    p.add_argument(
        "--features",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="feature setting (a FeatureConfig field, e.g. cepstra=20), recorded in the file: "
        "a model trained with it computes these features",
    )
    p.add_argument("--jobs", type=int, default=_default_jobs())


def _run_cmvn(args: argparse.Namespace) -> int:
    if args.window < 0 or args.prior_frames < 0:
        raise ValueError("--window and --prior-frames must be >= 0")
    features = FeatureConfig.from_dict(_parse_overrides(args.features, "feature"))
    utterances = read_manifest(args.manifest)
    workers = args.jobs if args.jobs > 1 else 0
    cmvn = manifest_cmvn(utterances, features, max_utterances=args.max_utterances, workers=workers)
    cmvn = dataclasses.replace(
        cmvn, window=args.window, prior_frames=args.prior_frames, features=features
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    cmvn.save(args.out)
    print(f"{args.out}: CMVN over {cmvn.frames} frames ({cmvn.frames / 360000:.2f} h)")
    return 0


def _parse_overrides(items: list[str], what: str) -> dict[str, Any]:
    """`KEY=VALUE` pairs; VALUE is read as JSON when it parses (numbers, true, null), else text."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ValueError(f"{what} override {item!r} is not KEY=VALUE")
        try:
            out[key] = json.loads(raw)
        except json.JSONDecodeError:
            out[key] = raw
    return out


def _add_train(p: argparse.ArgumentParser) -> None:
    p.add_argument("--exp-dir", required=True, type=Path, help="checkpoints, logs; resumes here")
    p.add_argument("--model", required=True, choices=sorted(MODELS))
    p.add_argument("--preset", required=True, help="model and training preset, e.g. cpu-small")
    p.add_argument("--train", required=True, type=Path, help="training manifest (JSONL)")
    p.add_argument("--dev", required=True, type=Path, help="validation manifest (JSONL)")
    p.add_argument("--tokenizer", required=True, type=Path)
    p.add_argument("--cmvn", required=True, type=Path)
    p.add_argument("--epochs", type=int, help="override the preset's epochs")
    p.add_argument("--max-steps", type=int, help="stop after this many optimizer steps")
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    p.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="training config field"
    )
    p.add_argument(
        "--model-set", action="append", default=[], metavar="KEY=VALUE", help="model config field"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument(
        "--init",
        type=Path,
        help="start from these weights (bundle directory or checkpoint): fine-tuning; tensors "
        "whose shapes differ (e.g. a new output layer) start fresh",
    )


def _run_train(args: argparse.Namespace) -> int:
    tokenizer = Tokenizer.load(args.tokenizer)
    overrides = _parse_overrides(args.set, "training")
    if args.epochs is not None:
        overrides["epochs"] = args.epochs
    if args.preset not in TRAIN_PRESETS:
        raise ValueError(
            f"unknown preset {args.preset!r}; choose one of {', '.join(TRAIN_PRESETS)}"
        )
    train_config = TrainConfig.from_dict(TRAIN_PRESETS[args.preset].to_dict() | overrides)
    model_overrides = {"vocab_size": tokenizer.vocab_size} | _parse_overrides(
        args.model_set, "model"
    )
    config = model_config(args.model, args.preset, **model_overrides)
    experiment = Experiment(
        model_type=args.model,
        model_config=config.to_dict(),
        train=train_config,
        train_manifest=str(args.train.resolve()),
        dev_manifest=str(args.dev.resolve()),
        # The features the CMVN statistics are of, so they normalise what they measured.
        feature_config=CMVN.load(args.cmvn).features or FeatureConfig(),
        preset=args.preset,
        init="" if args.init is None else str(args.init.resolve()),
    )
    trainer = Trainer(
        args.exp_dir,
        experiment,
        args.tokenizer,
        args.cmvn,
        device=args.device,
        progress=not args.no_progress and sys.stderr.isatty(),
    )
    return _train(trainer, args.max_steps, "asr train")


def _train(trainer: Trainer, max_steps: int | None, command: str) -> int:
    """Run `trainer`; 1 when a signal stopped it (after its checkpoint), else 0."""
    try:
        trainer.train(max_steps=max_steps)
    except TrainingInterrupted as err:
        print(f"{command}: {err}", file=sys.stderr)
        return 1
    return 0


def _add_export(p: argparse.ArgumentParser) -> None:
    p.add_argument("--exp-dir", required=True, type=Path)
    p.add_argument("--average", type=int, default=1, help="average the last N checkpoints")
    p.add_argument("--out", required=True, type=Path, help="bundle directory to write")
    p.add_argument(
        "--no-calibrate",
        action="store_true",
        help="store no word confidence calibration (confidences stay raw)",
    )
    p.add_argument(
        "--calibration-manifest",
        type=Path,
        help="manifest to calibrate word confidences on (default: the experiment's dev set)",
    )
    p.add_argument(
        "--calibration-utterances",
        type=int,
        default=300,
        help="calibrate on at most this many of its utterances, evenly spaced",
    )
    p.add_argument(
        "--lm",
        type=Path,
        help="also calibrate for decoding with this language model fused (an LM bundle, "
        "ARPA file or LM mix; serve with the same --lm): LM-fused words get their own "
        "calibration",
    )
    p.add_argument(
        "--lm-weight",
        type=float,
        help=f"the LM weight to calibrate at (default {DEFAULT_LM_WEIGHT}, an LM mix's 1); "
        "recorded in the bundle, so decoding with the same LM and no --lm-weight of its own "
        "uses it",
    )
    p.add_argument(
        "--length-bonus",
        type=float,
        help="the length bonus per unit that goes with it (default: the LM's for that weight); "
        "recorded the same way",
    )


def _run_export(args: argparse.Namespace) -> int:
    out = export_experiment(
        args.exp_dir,
        args.out,
        average=args.average,
        calibrate=not args.no_calibrate,
        calibration_manifest=args.calibration_manifest,
        calibration_utterances=args.calibration_utterances,
        lm=args.lm,
        lm_weight=args.lm_weight,
        length_bonus=args.length_bonus,
    )
    results = json.loads((out / "config.json").read_text())["results"]
    dev = results["dev"]
    print(
        f"{out}: bundle written; dev WER {dev['wer']:.2f} %, CER {dev['cer']:.2f} % "
        f"({dev['utterances']} utterances, greedy)"
    )
    for key, what in (("calibration", ""), ("lm_calibration", " with the LM")):
        cal = results.get(key)
        if cal is not None and "skipped" in cal:
            print(f"word confidence{what} left uncalibrated: {cal['skipped']}")
        elif cal is not None:
            print(
                f"word confidence{what} calibrated on {cal['words']} words of "
                f"{cal['utterances']} dev utterances ({cal['method']}, "
                f"{cal['word_accuracy']:.1%} right): "
                f"ECE {cal['ece_before']:.3f} -> {cal['ece_after']:.3f}"
            )
    return 0


def _add_decode_options(p: argparse.ArgumentParser) -> None:
    """Decoding flags shared by `asr decode` and `asr transcribe`."""
    p.add_argument(
        "--method",
        help="greedy | beam | joint | rescore (LAS; CTC with --rescore-model); "
        "default: the bundle's (beam for BiLSTM-CTC, joint for LAS or with --rescore-model)",
    )
    p.add_argument("--beam", type=int, help="beam size (default: the bundle's, 10)")
    p.add_argument("--ctc-weight", type=float, help="CTC weight for joint and rescore")
    p.add_argument(
        "--rescore-model",
        type=Path,
        help="LAS bundle a CTC model decodes with: joint (one pass, both models; the default) "
        "or rescore (its n-best rescored)",
    )
    p.add_argument(
        "--lm",
        type=Path,
        help="language model fused into the beam search: an LM bundle (asr lm export), a "
        "word n-gram ARPA file (.arpa, .arpa.gz) or an LM mix of several (asr lm mix)",
    )
    p.add_argument(
        "--lm-weight", type=float, help=f"LM weight (default {DEFAULT_LM_WEIGHT}; an LM mix's 1)"
    )
    p.add_argument(
        "--ilm-weight",
        type=float,
        help="subtract the attention decoder's internal LM estimate at this weight (ILME; "
        "LAS, joint and rescore searches; default 0), typically beside --lm",
    )
    p.add_argument(
        "--length-bonus",
        type=float,
        help="score added per emitted unit (with --lm: default the LM's, weight x ln "
        "perplexity for an LSTM LM, 1.0 for an n-gram)",
    )
    p.add_argument(
        "--hotwords",
        type=Path,
        metavar="FILE",
        help=f"phrases to favour, one per line, optionally PHRASE<TAB>BOOST (default boost "
        f"{DEFAULT_BOOST:g} per unit)",
    )
    p.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="any DecodeOptions field"
    )
    _add_quantize(p)


def _add_quantize(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--quantize",
        choices=QUANTIZATIONS,
        default="none",
        help="int8: run the acoustic models (and an LSTM LM) with int8 LSTM and Linear "
        "weights (CPU only; faster, WER within a few tenths)",
    )


def read_hotwords(path: Path) -> tuple[tuple[str, float], ...]:
    """A hotword file: one phrase per line, optionally followed by a tab and its boost; blank
    lines and lines starting with # are skipped. ValueError names the file and line."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: cannot read the hotwords file: {err}") from err
    phrases = []
    for number, line in enumerate(lines, 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        phrase, _, boost = line.partition("\t")
        try:
            value = float(boost) if boost.strip() else DEFAULT_BOOST
        except ValueError:
            raise ValueError(f"{path}:{number}: the boost {boost!r} is not a number") from None
        phrases.append((phrase.strip(), value))
    return tuple(phrases)


def _decode_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """DecodeOptions fields the command line sets (validated by `DecodeOptions.override`)."""
    flags = {
        "method": args.method,
        "beam": args.beam,
        "ctc_weight": args.ctc_weight,
        "lm_weight": args.lm_weight,
        "ilm_weight": args.ilm_weight,
        "length_bonus": args.length_bonus,
        "hotwords": None if args.hotwords is None else read_hotwords(args.hotwords),
    }
    return {k: v for k, v in flags.items() if v is not None} | _parse_overrides(
        args.set, "decoding"
    )


def _add_decode(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, type=Path, help="bundle directory")
    p.add_argument("--manifest", required=True, type=Path, help="JSONL manifest to transcribe")
    p.add_argument("--out", required=True, type=Path, help="directory for hypotheses and scores")
    _add_decode_options(p)
    p.add_argument(
        "--streaming",
        action="store_true",
        help="send each utterance through a streaming session in 100 ms chunks, as the server "
        "does (latency-controlled BiLSTM-CTC); results are filed as method streaming-METHOD",
    )
    p.add_argument("--name", help="test set name in --results (default: manifest file stem)")
    p.add_argument("--results", type=Path, help="results.json to add this test set to")
    p.add_argument("--worst", type=int, default=20, help="worst utterances in the report")
    p.add_argument("--device", default="cpu")


def _run_decode(args: argparse.Namespace) -> int:
    try:  # the bundle's decoding options with the command line's on top
        recognizer = load_model(
            args.model,
            args.device,
            rescorer=args.rescore_model,
            lm=args.lm,
            quantize=args.quantize,
            **_decode_overrides(args),
        )
    except TypeError as err:  # an unknown option name is a bad argument
        raise ValueError(str(err)) from err
    options = recognizer.options
    utterances = read_manifest(args.manifest)
    start = time.time()
    decode = stream_manifest if args.streaming else transcribe_manifest
    transcripts = decode(recognizer, utterances, options)
    seconds = time.time() - start
    rates, summary = score_decode(
        utterances,
        transcripts,
        options,
        streaming=args.streaming,
        manifest=args.manifest,
        seconds=seconds,
        rescore_model=None if recognizer.rescorer is None else args.rescore_model,
        lm=recognizer.lm,
    )
    write_decode(args.out, utterances, transcripts, rates, summary, args.worst)
    name = args.name or args.manifest.stem
    if args.results is not None:
        add_results(args.results, recognizer.bundle.config, name, summary)
    print(decode_line(name, rates, summary, seconds, args.out))
    return 0


def _add_results_table(p: argparse.ArgumentParser) -> None:
    p.add_argument("results", type=Path, nargs="+", help="results.json files of experiments")


def _run_results_table(args: argparse.Namespace) -> int:
    """A Markdown table: one row per model and method, WER / CER per test set."""
    experiments = []
    for path in args.results:
        try:
            experiments.append(json.loads(path.read_text()))
        except (OSError, ValueError) as err:
            raise ValueError(f"{path}: not a results file ({err})") from err
    sets = list(
        dict.fromkeys(s for e in experiments for m in e.get("methods", {}).values() for s in m)
    )
    print("| model | method | " + " | ".join(sets) + " |")
    print("|---|---|" + "---|" * len(sets))
    for e in experiments:
        label = f"{e.get('model')} {e.get('preset')}"
        for method, by_set in e.get("methods", {}).items():
            cells = [
                f"{by_set[s]['wer']:.2f} / {by_set[s]['cer']:.2f}" if s in by_set else "-"
                for s in sets
            ]
            print(f"| {label} | {method} | " + " | ".join(cells) + " |")
    print("(WER / CER in %)")
    return 0


def _add_serve(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        action="append",
        required=True,
        metavar="NAME=BUNDLE_DIR",
        help="a model to serve (repeatable; the first is the default)",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to listen on ([::] for all)")
    p.add_argument("--port", type=int, default=50051)
    p.add_argument(
        "--max-streams",
        type=int,
        default=0,
        help="concurrent streams (default: sized at start-up from measured capacity)",
    )
    p.add_argument("--max-stream-seconds", type=float, default=3600.0)
    p.add_argument("--max-unary-seconds", type=float, default=600.0)
    p.add_argument(
        "--max-message-bytes", type=int, default=32 * 1024 * 1024, help="request message size"
    )
    p.add_argument("--max-beam", type=int, default=64, help="largest beam_size a request may ask")
    p.add_argument(
        "--max-alternatives", type=int, default=10, help="largest n-best a request may ask"
    )
    p.add_argument(
        "--workers",
        type=int,
        default=0,
        help="model workers, each on its own core(s), streams balanced across them "
        "(default 0: one per usable core over --torch-threads)",
    )
    p.add_argument("--torch-threads", type=int, default=1, help="threads of each model worker")
    p.add_argument("--max-batch", type=int, default=16, help="Recognize calls per batch")
    p.add_argument("--max-wait-ms", type=float, default=10.0, help="batch collection window")
    p.add_argument(
        "--max-stream-batch",
        type=int,
        default=128,
        help="stream chunks run together, encoder and search batched (1: each stream alone)",
    )
    p.add_argument(
        "--stream-wait-ms", type=float, default=10.0, help="stream batch collection window"
    )
    p.add_argument("--grace-seconds", type=float, default=10.0, help="drain time on SIGTERM")
    p.add_argument("--trailing-silence", type=float, default=0.8, help="endpoint rule (s)")
    p.add_argument("--max-segment", type=float, default=30.0, help="endpoint rule (s)")
    p.add_argument("--metrics-port", type=int, help="serve Prometheus /metrics on this port")
    p.add_argument(
        "--http-port",
        type=int,
        help="also serve the OpenAI-compatible HTTP API (/v1/audio/transcriptions) on this port",
    )
    p.add_argument(
        "--max-http-requests",
        type=int,
        default=64,
        help="HTTP API transcriptions in flight (more get 429)",
    )
    p.add_argument(
        "--auth-token-file",
        type=Path,
        help="require `authorization: Bearer <token>` with the token in this file",
    )
    p.add_argument(
        "--rescore-model",
        action="append",
        default=[],
        metavar="NAME=LAS_BUNDLE_DIR",
        help="model NAME's finals decoded with this LAS bundle too: joint CTC/attention beam "
        "search over each segment (repeatable)",
    )
    p.add_argument(
        "--lm",
        action="append",
        default=[],
        metavar="NAME=LM",
        help="model NAME's beam searches (streaming partials and finals too) fuse this "
        "language model: an LM bundle directory, ARPA file or LM mix (asr lm mix; repeatable)",
    )
    p.add_argument(
        "--chunk-size",
        type=int,
        help="run BiLSTM-CTC models latency-controlled with blocks of this many encoder frames "
        "(40 ms each) instead of their bundles': smaller gives earlier partial results",
    )
    p.add_argument(
        "--right-context", type=int, help="look-ahead frames with --chunk-size (default: half)"
    )
    _add_quantize(p)
    p.add_argument("--tls-cert", type=Path, help="PEM certificate chain: serve TLS only")
    p.add_argument("--tls-key", type=Path, help="PEM private key of --tls-cert")
    p.add_argument(
        "--log-format", choices=("text", "json"), default="text", help="log lines on stderr"
    )


def _run_serve(args: argparse.Namespace) -> int:
    import asyncio

    from asr.client import read_token
    from asr.streaming import EndpointConfig
    from server.app import serve
    from server.config import ServerConfig
    from server.logs import configure as configure_logging

    config = ServerConfig(
        models=_name_paths(args.model, "--model"),
        rescorers=_name_paths(args.rescore_model, "--rescore-model"),
        lms=_name_paths(args.lm, "--lm"),
        chunking=_chunking(args.chunk_size, args.right_context),
        quantize=args.quantize,
        host=args.host,
        port=args.port,
        max_concurrent_streams=args.max_streams,
        max_stream_seconds=args.max_stream_seconds,
        max_unary_seconds=args.max_unary_seconds,
        max_message_bytes=args.max_message_bytes,
        max_beam=args.max_beam,
        max_alternatives=args.max_alternatives,
        workers=args.workers,
        torch_threads=args.torch_threads,
        max_batch=args.max_batch,
        max_wait_ms=args.max_wait_ms,
        max_stream_batch=args.max_stream_batch,
        stream_wait_ms=args.stream_wait_ms,
        grace_seconds=args.grace_seconds,
        endpoint=EndpointConfig(args.trailing_silence, args.max_segment),
        auth_token=read_token(args.auth_token_file),
        metrics_port=args.metrics_port,
        http_port=args.http_port,
        max_http_requests=args.max_http_requests,
        tls_cert=None if args.tls_cert is None else str(args.tls_cert),
        tls_key=None if args.tls_key is None else str(args.tls_key),
    )
    configure_logging(args.log_format)
    asyncio.run(serve(config))
    return 0


def _chunking(chunk_size: int | None, right_context: int | None) -> tuple[int, int] | None:
    if chunk_size is None:
        if right_context is not None:
            raise ValueError("--right-context needs --chunk-size")
        return None
    return chunk_size, chunk_size // 2 if right_context is None else right_context


def _name_paths(items: list[str], flag: str) -> tuple[tuple[str, str], ...]:
    pairs = []
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"{flag} {item!r} is not NAME=PATH")
        pairs.append((name, path))
    return tuple(pairs)


def _add_client(p: argparse.ArgumentParser) -> None:
    p.add_argument("files", nargs="+", type=Path, help="audio files (WAV, FLAC, OGG)")
    p.add_argument("--server", default="localhost:50051", help="HOST:PORT")
    p.add_argument("--model", default="", help="model name (default: the server's default)")
    p.add_argument("--stream", action="store_true", help="StreamingRecognize, with interim results")
    p.add_argument("--realtime", action="store_true", help="send audio at real-time pace")
    p.add_argument("--words", action="store_true", help="print word timings")
    p.add_argument("--token-file", type=Path, help="bearer token for a server that needs one")
    p.add_argument("--tls", action="store_true", help="connect over TLS (system CAs)")
    p.add_argument("--tls-ca", type=Path, help="connect over TLS trusting this PEM CA bundle")


def _run_client(args: argparse.Namespace) -> int:
    import grpc

    from asr.audio import load_audio
    from asr.client import connect

    failed = 0
    with connect(
        args.server, token_file=args.token_file, tls=args.tls, tls_ca=args.tls_ca
    ) as client:
        for path in args.files:
            try:
                if args.stream:
                    print(f"{path}:")
                    _stream_file(client, load_audio(path), args)
                else:
                    response = client.recognize(
                        path.read_bytes(), model=args.model, word_time_offsets=args.words
                    )
                    text = " ".join(r.alternatives[0].transcript for r in response.results)
                    print(f"{path}: {text}")
                    if args.words:
                        _print_words(response.results)
            except grpc.RpcError as err:
                print(f"{path}: {err.code().name}: {err.details()}", file=sys.stderr)
                failed += 1
            except OSError as err:  # AudioError (a ValueError) and unreadable files
                print(f"{path}: {err}", file=sys.stderr)
                failed += 1
    return 1 if failed else 0


def _stream_file(client: Any, samples: torch.Tensor, args: argparse.Namespace) -> None:
    from asr.client import to_seconds

    responses = client.stream(
        samples, model=args.model, realtime=args.realtime, word_time_offsets=args.words
    )
    for response in responses:
        for result in response.results:
            text = result.alternatives[0].transcript if result.alternatives else ""
            end = to_seconds(result.result_end_time)
            kind = "final" if result.is_final else f"interim (stability {result.stability:.2f})"
            print(f"  [{end:7.2f} s] {kind}: {text}", flush=True)
            if result.is_final and args.words:
                _print_words([result])


def _print_words(results: Any) -> None:
    from asr.client import to_seconds

    for result in results:
        for w in result.alternatives[0].words:
            start, end = to_seconds(w.start_offset), to_seconds(w.end_offset)
            print(f"  {start:7.2f} {end:7.2f} {w.confidence:.2f} {w.word}")


def _add_transcribe(p: argparse.ArgumentParser) -> None:
    from asr import transcribe

    transcribe.add_arguments(p)
    _add_decode_options(p)


def _run_transcribe(args: argparse.Namespace) -> int:
    from asr import transcribe

    return transcribe.run(args, _decode_overrides(args))


def _add_lm(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="lm_command", required=True, metavar="LM_COMMAND")
    train = sub.add_parser("train", help="train an LSTM LM on text (run under torchrun for DDP)")
    train.add_argument("--exp-dir", required=True, type=Path, help="checkpoints, logs; resumes")
    train.add_argument("--preset", required=True, help="LM and training preset, e.g. cpu-small")
    train.add_argument(
        "--train", required=True, type=Path, help="text (one sentence per line) or JSONL manifest"
    )
    train.add_argument("--dev", required=True, type=Path, help="validation text or manifest")
    train.add_argument(
        "--tokenizer", required=True, type=Path, help="the acoustic models' tokenizer.model"
    )
    train.add_argument("--epochs", type=int, help="override the preset's epochs")
    train.add_argument("--max-steps", type=int, help="stop after this many optimizer steps")
    train.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    train.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    train.add_argument("--model-set", action="append", default=[], metavar="KEY=VALUE")
    train.add_argument("--no-progress", action="store_true", help="no progress bar")
    export = sub.add_parser("export", help="write an LM bundle from an LM experiment")
    export.add_argument("--exp-dir", required=True, type=Path)
    export.add_argument("--average", type=int, default=1, help="average the last N checkpoints")
    export.add_argument("--out", required=True, type=Path, help="LM bundle directory to write")
    ppl = sub.add_parser("perplexity", help="per-unit perplexity of an LM bundle on text")
    ppl.add_argument("--lm", required=True, type=Path, help="LM bundle directory")
    ppl.add_argument("--text", required=True, type=Path, help="text or JSONL manifest")
    ngram = sub.add_parser("ngram", help="estimate a word n-gram (ARPA) from text")
    ngram.add_argument("--text", required=True, type=Path, help="text or JSONL manifest")
    ngram.add_argument("--order", type=int, default=3)
    ngram.add_argument("--out", required=True, type=Path, help="ARPA file to write")
    mix = sub.add_parser(
        "mix", help="write an LM mix file: several LMs fused together, each at its own weight"
    )
    mix.add_argument(
        "--part",
        nargs=2,
        action="append",
        required=True,
        metavar=("LM", "WEIGHT"),
        help="an LM bundle directory or ARPA file and the weight it fuses at (once per LM); "
        "--lm-weight then scales them all (default 1)",
    )
    mix.add_argument("--out", required=True, type=Path, help="LM mix file to write (.json)")
    mix.add_argument(
        "--tokenizer", type=Path, help="load every part for this tokenizer.model, to check it"
    )
    text = sub.add_parser(
        "text", help="the normalised sentences of text files and manifests, as LM training text"
    )
    text.add_argument("inputs", nargs="*", type=Path, help="text files (ID TEXT lines too), JSONL")
    text.add_argument(
        "--gcide",
        action="append",
        default=[],
        type=Path,
        help="the prose of a GCIDE dictionary file too (Debian's dict-gcide: "
        "/usr/share/dictd/gcide.dict.dz), 3 M words of English; repeatable",
    )
    text.add_argument("--out", required=True, type=Path, help="text file to write")
    text.add_argument(
        "--exclude",
        action="append",
        default=[],
        type=Path,
        help="drop sentences found in this text or manifest (e.g. the test sets'; repeatable)",
    )
    text.add_argument(
        "--exclude-overlap",
        type=int,
        default=0,
        metavar="N",
        help="also drop sentences that share N words in a row with an excluded one "
        "(outside text may quote a test sentence inside a longer one; default 0: off)",
    )
    text.add_argument(
        "--unique",
        action="store_true",
        help="keep each sentence once (a corpus read by several voices lists it per voice)",
    )


def _write_mix(parts: list[list[str]], out: Path, tokenizer: Path | None) -> int:
    from asr.language_model import MIX_SUFFIX, load_language_model, write_mix

    if out.suffix != MIX_SUFFIX:
        raise ValueError(f"{out}: an LM mix file's name ends in {MIX_SUFFIX}")
    weighted = []
    for path, weight in parts:
        try:
            weighted.append((float(weight), Path(path)))
        except ValueError:
            raise ValueError(f"lm mix: the weight {weight!r} of {path} is not a number") from None
        if not Path(path).exists():
            raise ValueError(f"{path}: no such LM (an LM bundle directory or ARPA file)")
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(out) as tmp:
        write_mix(tmp, weighted)  # paths relative to tmp's folder: out's
    if tokenizer is not None:
        print(f"{out}: {load_language_model(out, Tokenizer.load(tokenizer)).describe()}")
    else:
        print(f"{out}: an LM mix of {', '.join(f'{w:g} x {p}' for w, p in weighted)}")
    return 0


def _run_lm(args: argparse.Namespace) -> int:
    from asr.bundle import load_lm_bundle
    from asr.models.lm import PRESETS as LM_PRESETS
    from asr.models.lm import LSTMLMConfig
    from asr.training import lm

    if args.lm_command == "export":
        out = lm.export_lm(args.exp_dir, args.out, average=args.average)
        dev = json.loads((out / "config.json").read_text())["results"]["dev"]
        print(f"{out}: dev perplexity {dev['perplexity']:.2f}")
        return 0
    if args.lm_command == "ngram":
        from asr.models.ngram import write_arpa

        args.out.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(args.out) as tmp:
            write_arpa(lm.read_sentences(args.text), tmp, order=args.order)
        with args.out.open(encoding="utf-8") as arpa:
            counts = [line.split("=")[1].strip() for line in arpa if line.startswith("ngram ")]
        print(f"{args.out}: {args.order}-gram of {args.text} ({' / '.join(counts)} n-grams)")
        return 0
    if args.lm_command == "mix":
        return _write_mix(args.part, args.out, args.tokenizer)
    if args.lm_command == "text":
        if not args.inputs and not args.gcide:
            raise ValueError("lm text: no input (give text files or --gcide)")
        allowed = lm.OverlapFilter(
            [s for path in args.exclude for s in lm.read_sentences(path)], args.exclude_overlap
        )
        sources = [
            *((p, lm.read_sentences) for p in args.inputs),
            *((p, lm.read_gcide) for p in args.gcide),
        ]
        seen: set[int] = set()  # hashes, so a large text needs 8 bytes per sentence, not its text
        kept = dropped = repeated = 0
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(args.out) as tmp, tmp.open("w", encoding="utf-8") as sink:
            for path, read in sources:
                for sentence in read(path):
                    if not allowed(sentence):
                        dropped += 1
                        continue
                    if args.unique:
                        key = hash(sentence)
                        if key in seen:
                            repeated += 1
                            continue
                        seen.add(key)
                    sink.write(sentence + "\n")
                    kept += 1
        print(f"{args.out}: {kept} sentences ({dropped} excluded, {repeated} repeats dropped)")
        return 0
    if args.lm_command == "perplexity":
        bundle = load_lm_bundle(args.lm)
        data = lm.TextDataset(lm.read_sentences(args.text), bundle.tokenizer)
        result = lm.perplexity(bundle.model, data)
        print(
            f"{args.text}: perplexity {result['perplexity']:.2f} over {int(result['units'])} "
            f"units ({len(data)} sentences)"
        )
        return 0
    if args.preset not in lm.TRAIN_PRESETS or args.preset not in LM_PRESETS:
        raise ValueError(
            f"unknown LM preset {args.preset!r}; choose one of {', '.join(lm.TRAIN_PRESETS)}"
        )
    overrides = _parse_overrides(args.set, "training")
    if args.epochs is not None:
        overrides["epochs"] = args.epochs
    train_config = TrainConfig.from_dict(lm.TRAIN_PRESETS[args.preset].to_dict() | overrides)
    tokenizer = Tokenizer.load(args.tokenizer)
    config = LSTMLMConfig.from_dict(
        LM_PRESETS[args.preset].to_dict()
        | {"vocab_size": tokenizer.vocab_size}
        | _parse_overrides(args.model_set, "model")
    )
    experiment = Experiment(
        model_type=lm.MODEL_TYPE,
        model_config=config.to_dict(),
        train=train_config,
        train_manifest=str(args.train.resolve()),
        dev_manifest=str(args.dev.resolve()),
        preset=args.preset,
    )
    trainer = lm.LMTrainer(
        args.exp_dir,
        experiment,
        args.tokenizer,
        device=args.device,
        progress=not args.no_progress and sys.stderr.isatty(),
    )
    return _train(trainer, args.max_steps, "asr lm train")


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
    "train": Command("train a model (run under torchrun for DDP)", _add_train, _run_train),
    "export": Command("write a model bundle from an experiment", _add_export, _run_export),
    "lm": Command("language models: train, export, perplexity", _add_lm, _run_lm),
    "decode": Command("transcribe a manifest with a bundle and score it", _add_decode, _run_decode),
    "transcribe": Command(
        "transcribe files, directories or manifests (txt, jsonl, srt, vtt); resumable",
        _add_transcribe,
        _run_transcribe,
    ),
    "serve": Command("serve models over gRPC (batch and streaming)", _add_serve, _run_serve),
    "client": Command("transcribe files with a running server", _add_client, _run_client),
    "results": Command(
        "print experiments' results.json as a WER table", _add_results_table, _run_results_table
    ),
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
