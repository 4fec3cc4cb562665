"""The peer recognizer on our test sets: pocketsphinx (CMU, C) with its bundled generic US
English model, decoding the same manifests our models decode, scored by the same scorer
(`asr.metrics.error_rates`: the same text normalisation, corpus-level WER and CER).

pocketsphinx knows nothing of the test sentences or voices, so its column says how hard a test
set is for a generic recognizer: a model of ours that does worse on a voice it never heard has
learnt the training synthesizers, not speech.

    python bench/peer_wer.py --manifest heldout-festival=DATA/heldout-festival.jsonl \\
        [--manifest NAME=PATH ...] [--results EXP/peer/results.json] [--jobs N]

Writes, when --results is given, a results.json shaped as `asr decode --results` writes it
(model "pocketsphinx", method "default", "peer": true), so `asr results ours.json peer.json`
shows both, and <set>/hyps.tsv beside it. Last line:
    peer_wer pocketsphinx <set>=<wer>/<cer> ...
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from asr.audio import load_audio
from asr.data.manifest import Utterance, read_manifest
from asr.metrics import error_rates

_decoder: Any = None  # one pocketsphinx decoder per worker process


def _recognize(path: str) -> str:
    global _decoder
    if _decoder is None:
        import pocketsphinx

        _decoder = pocketsphinx.Decoder(loglevel="FATAL")  # bundled en-us model, LM, dict
    pcm = (load_audio(path).clamp(-1, 1) * 32767).round().short().numpy().tobytes()
    _decoder.start_utt()
    _decoder.process_raw(pcm, False, True)
    _decoder.end_utt()
    hyp = _decoder.hyp()
    return "" if hyp is None else str(hyp.hypstr)


def decode_set(utterances: list[Utterance], jobs: int) -> tuple[list[str], float]:
    """pocketsphinx's hypotheses of `utterances` (in order) and the wall time."""
    start = time.perf_counter()
    paths = [u.path for u in utterances]
    if jobs <= 1:
        hyps = [_recognize(p) for p in paths]
    else:
        with ProcessPoolExecutor(jobs) as pool:
            hyps = list(pool.map(_recognize, paths, chunksize=4))
    return hyps, time.perf_counter() - start


def _add_results(path: Path, peer: str, name: str, summary: dict[str, Any]) -> None:
    """Merge one set into a results.json shaped as `asr decode --results` writes it (model,
    preset, methods.<method>.<set>), which is what `asr results` reads."""
    results = json.loads(path.read_text()) if path.exists() else {}
    model, _, release = peer.partition(" ")
    results.update(model=model, preset=f"{release} generic en-us (peer)", peer=True)
    results.setdefault("methods", {}).setdefault(summary["method"], {})[name] = summary
    path.write_text(json.dumps(results, indent=2) + "\n")


def _named(item: str) -> tuple[str, Path]:
    name, sep, path = item.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"{item!r} is not NAME=MANIFEST")
    return name, Path(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--manifest", type=_named, action="append", required=True)
    parser.add_argument("--results", type=Path, help="results.json to write the peer's rates to")
    parser.add_argument("--jobs", type=int, default=1, help="decoding processes")
    args = parser.parse_args(argv)
    try:
        peer = f"pocketsphinx {version('pocketsphinx')}"
    except PackageNotFoundError:
        print("peer_wer: pocketsphinx is not installed: pip install -e '.[bench]'", file=sys.stderr)
        return 2
    sets = []
    for name, path in args.manifest:
        try:
            utterances = read_manifest(path)
        except (OSError, ValueError) as err:
            print(f"peer_wer: {err}", file=sys.stderr)
            return 2
        sets.append((name, path, utterances))
    line = [f"peer_wer {peer.split()[0]}"]
    for name, path, utterances in sets:
        hyps, seconds = decode_set(utterances, args.jobs)
        rates = error_rates([u.text for u in utterances], hyps)
        audio = sum(u.duration for u in utterances)
        print(
            f"{name}: {peer} WER {rates.wer:.2f} % CER {rates.cer:.2f} % "
            f"({rates.utterances} utterances, {seconds:.1f} s with {args.jobs} jobs)"
        )
        line.append(f"{name}={rates.wer:.2f}/{rates.cer:.2f}")
        if args.results is not None:
            out = args.results.parent / name
            out.mkdir(parents=True, exist_ok=True)
            rows = (f"{u.id}\t{u.text}\t{h}\n" for u, h in zip(utterances, hyps, strict=True))
            (out / "hyps.tsv").write_text("id\treference\thypothesis\n" + "".join(rows))
            summary = rates.to_dict() | {
                "method": "default",
                "manifest": str(path),
                "decode_seconds": round(seconds, 2),
                "rtf": round(seconds * args.jobs / max(audio, 1e-9), 4),
            }
            _add_results(args.results, peer, name, summary)
    print(" ".join(line))
    return 0


if __name__ == "__main__":
    sys.exit(main())
