"""`asr transcribe`: audio files, directories, manifests or lists on stdin -> transcripts, with a
model bundle (`--model`) or a running server (`--server`).

    asr transcribe audio/ --model BUNDLE --format jsonl --out hyps.jsonl   # rerun to resume
    find /data -name '*.flac' | asr transcribe - --model BUNDLE --shard 3/8 --out part3.jsonl
    asr transcribe talk.wav --model BUNDLE --format srt --out subtitles/
    asr transcribe audio/ --server HOST:PORT --token-file TOKEN --format txt

How a run goes:
- Inputs are expanded (directories recursively by `AUDIO_EXTENSIONS`, manifests line by line,
  `-` as one path a line), sorted by path and given ids (see `assign_ids`). `--shard I/N` keeps
  every N-th input from the I-th, so N jobs over the same inputs cover each exactly once.
  Inputs the output already holds are skipped, so a rerun finishes an interrupted run.
- Files up to `--long-audio` seconds are read by `--workers` threads and decoded in batches of
  similar length. Longer files are read in blocks (memory stays bounded by a segment) and
  split into segments with times from the start of the file: a streaming-capable bundle
  (latency-controlled BiLSTM-CTC) runs a `StreamingSession`, whose endpointer ends segments at
  pauses; any other bundle gets pieces of at most `--max-segment` seconds cut at the quietest
  moment near their end (`cut_at_pauses`).
- Each file's result is written and flushed as soon as it is done. A file that cannot be used
  is named on stderr with the reason and skipped; the run goes on, and exits 1 at the end.

Output (`--out`; stdout without it):
- txt: `ID<TAB>TEXT` lines; jsonl: one object per file (`FileResult.to_json`). Both append to an
  existing file, skip the ids it holds, and drop a torn last line left by a killed run.
- srt/vtt: one cue per segment, split where it would exceed `--cue-words` words or 6 s, and at
  pauses over a second. Into one file, the inputs follow one another on one timeline (each
  offset by the length of those before it, in input order; VTT marks each with a NOTE), so a
  single input gets exactly its own subtitles. Written when the run ends; not resumable.
- `--out DIR/` (an existing directory, or a path ending in `/`): one `ID.FORMAT` file per input,
  written atomically; inputs whose file exists are skipped.

The parts: `inputs` (expansion, ids, shards, probing), `engines` (a local recognizer or a
server), `segmentation` (cuts at pauses, subtitle cues), `writers` (a class per format and
the outputs), `progress`, and `cli` (the arguments and the run).
"""

from asr.transcribe.cli import LONG_AUDIO, add_arguments, run
from asr.transcribe.engines import Engine, LocalEngine, ServerEngine, run_engine
from asr.transcribe.inputs import Item, assign_ids, collect, parse_shard, probe, shard
from asr.transcribe.progress import Progress
from asr.transcribe.results import Failure, FileResult, Outcome, Segment
from asr.transcribe.segmentation import Cue, cues, cut_at_pauses, quietest_cut, shifted
from asr.transcribe.writers import (
    FORMATS,
    WRITERS,
    DirOutput,
    LineOutput,
    LineWriter,
    Output,
    ResultWriter,
    SubtitleOutput,
    SubtitlesWriter,
    WriteJSONL,
    WriteSRT,
    WriteTXT,
    WriteVTT,
    open_output,
)

__all__ = [
    "FORMATS",
    "LONG_AUDIO",
    "WRITERS",
    "Cue",
    "DirOutput",
    "Engine",
    "Failure",
    "FileResult",
    "Item",
    "LineOutput",
    "LineWriter",
    "LocalEngine",
    "Outcome",
    "Output",
    "Progress",
    "ResultWriter",
    "Segment",
    "ServerEngine",
    "SubtitleOutput",
    "SubtitlesWriter",
    "WriteJSONL",
    "WriteSRT",
    "WriteTXT",
    "WriteVTT",
    "add_arguments",
    "assign_ids",
    "collect",
    "cues",
    "cut_at_pauses",
    "open_output",
    "parse_shard",
    "probe",
    "quietest_cut",
    "run",
    "run_engine",
    "shard",
    "shifted",
]
