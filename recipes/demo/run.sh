#!/usr/bin/env bash
# The one-command demo (`make demo`): synthesize a small corpus with TTS voices, train a
# cpu-small BiLSTM-CTC (about 10 minutes on 2 cores), export it, serve it over gRPC, stream a
# held-out utterance through the server in real time (interim and final results), print the WER
# on the held-out sets, stop the server. Each step's time is printed as it ends and in a table
# at the end. Everything lives in WORK (exp/demo); a second run reuses it.
#
# Usage:
#   make demo                                   # installs first (make setup), then this script
#   recipes/demo/run.sh                         # the same, once .venv exists
#   recipes/demo/run.sh --epochs 30 --work /tmp/demo   # train longer elsewhere
#   recipes/demo/run.sh --fresh                 # delete WORK and start over
#
# Steps (each is skipped when its output exists; the commands are printed as they run):
#   1 text     recipes/demo/sentences.txt: every 10th sentence held out, the rest train
#   2 synth    asr synth: 17 training voices of three engines (espeak-ng, flite, festival), 4
#              reading each training sentence (with rate and pitch jitter); 2 of them read the
#              held-out sentences (dev, "heldout-sentences"); a voice of a kind of synthesis
#              never heard in training, festival's HTS slt, reads them too ("heldout-engine")
#   3 prepare  asr prepare, asr tokenizer (characters), asr cmvn (3 s sliding window), asr lm
#              ngram (a word 3-gram of the training sentences only)
#   4 train    asr train --model ctc --preset cpu-small with noise, reverb, channel, pitch and
#              VTLP augmentation (resumes if interrupted)
#   5 export   asr export -> WORK/bundle (word confidences calibrated without and with the LM,
#              and the LM's weight, 1.2, and length bonus, 2.0, chosen on dev)
#   6 serve    asr serve --model demo=WORK/bundle --lm demo=WORK/data/lm.arpa; python -m
#              asr.healthcheck waits for SERVING
#   7 stream   asr client --stream --realtime on a held-out sentence in the held-out engine's voice
#   8 score    asr decode on both held-out sets, without and with the LM (summary line: WER,
#              CER, errors)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)

work=$repo/exp/demo
text=$here/sentences.txt
epochs=12
port=0                      # 0: any free port
jobs=$(nproc)
fresh=0
# Voices of three engines (formant: espeak-ng incl. Klatt; diphone: flite, festival), four per
# sentence. A voice of yet another kind, festival's HTS (statistical parametric) slt, is the
# held-out engine; flite's slt (the same speaker, diphone) is left out of training with it.
train_voices=espeak:en-us+m1,espeak:en-us+m3,espeak:en-us+m6,espeak:en-us+f1,espeak:en-us+f4
train_voices+=,espeak:en-gb+m3,espeak:en-gb+f2,espeak:en-gb-x-rp+m5,espeak:en-029+m7
train_voices+=,espeak:en-us+klatt,espeak:en-us+klatt4,espeak:en-gb+klatt2
train_voices+=,flite:awb,flite:rms,flite:kal16,festival:kal_diphone,festival:ked_diphone
dev_voices=espeak:en-us+m1,festival:kal_diphone
heldout_engine=festival:cmu_us_slt_arctic_hts

while [[ $# -gt 0 ]]; do
  case "$1" in
    --work) work=$2; shift 2 ;;
    --epochs) epochs=$2; shift 2 ;;
    --port) port=$2; shift 2 ;;
    --jobs) jobs=$2; shift 2 ;;
    --fresh) fresh=1; shift ;;
    -h|--help) sed -n '2,/^set -euo/{/^set/!p}' "$0"; exit 0 ;;
    *) echo "unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done

# The virtualenv `make setup` builds, else whatever `asr` is on PATH.
if [[ -x $repo/.venv/bin/asr ]]; then
  asr=$repo/.venv/bin/asr python=$repo/.venv/bin/python
elif command -v asr >/dev/null; then
  asr=$(command -v asr) python=$(dirname "$asr")/python
else
  echo "asr is not installed: run make demo (or make setup first)" >&2
  exit 1
fi

run() { echo "+ $*"; "$@"; }
# Each step's wall time, printed as it ends and again in a table at the end, so a user can set
# what their machine took against the figures in the README.
stage='' stage_start=0 times=()
end_stage() {
  [[ -n $stage ]] || return 0
  local took=$(( $(date +%s) - stage_start ))
  times+=("$(printf '%-8s %5d s' "$stage" "$took")")
  printf -- '-- %s took %d s\n' "$stage" "$took"
  stage=
}
# "N/8 name: ..." starts step `name`; any other heading ends the step before it.
say() {
  end_stage
  printf '\n== %s\n' "$*"
  if [[ $1 =~ ^[0-9]+/[0-9]+\ ([a-z]+): ]]; then
    stage=${BASH_REMATCH[1]} stage_start=$(date +%s)
  fi
}
reused=()
done_stamp() { [[ -f $work/.done/$1 ]] && reused+=("$1"); }
mark() { mkdir -p "$work/.done" && touch "$work/.done/$1"; }

banner() {
  local sentences words
  sentences=$(grep -c . "$text")
  words=$(tr -cs "A-Za-z'" '\n' < "$text" | tr '[:upper:]' '[:lower:]' | sort -u | grep -c .)
  cat <<EOF
================================================================================
 asr demo: a speech recognizer trained from scratch in minutes on a CPU.
 Its training data are SYNTHETIC: espeak-ng, flite and festival voices
 reading $sentences short assistant-style sentences ($words different words). It
 recognises such voices saying such sentences; it will NOT transcribe your own
 voice or open-vocabulary speech. Models for real speech come from the
 LibriSpeech recipe on GPUs (recipes/librispeech/README.md, docker/README.md).
================================================================================
EOF
}

banner
start=$(date +%s)
if [[ $fresh == 1 && -e $work ]]; then
  # Only a directory this script made: --work may point anywhere.
  [[ -d $work/.done || -z $(ls -A "$work") ]] || {
    echo "--fresh: $work is not a directory this demo made; remove it yourself" >&2
    exit 2
  }
  run rm -rf "$work"
fi
mkdir -p "$work"
corpus=$work/LibriSpeech
data=$work/data
manifests=$data/manifests
exp=$work/exp
bundle=$work/bundle

if ! done_stamp text; then
  say "1/8 text: held-out sentences (every 10th) never appear in training"
  mkdir -p "$work/text"
  awk -v dir="$work/text" '{ print > (dir "/" (NR % 10 == 0 ? "heldout" : "train") ".txt") }' "$text"
  wc -l "$work/text"/*.txt
  mark text
fi

if ! done_stamp synth; then
  say "2/8 synth: TTS voices read the sentences (LibriSpeech layout)"
  run "$asr" synth --text "$work/text/train.txt" --voices "$train_voices" --voices-per-sentence 4 \
    --rate-jitter 0.1 --pitch-jitter 10 --out "$corpus" --subset train --jobs "$jobs"
  run "$asr" synth --text "$work/text/heldout.txt" --voices "$dev_voices" --out "$corpus" \
    --subset heldout-sentences --jobs "$jobs"
  run "$asr" synth --text "$work/text/heldout.txt" --voices "$heldout_engine" --out "$corpus" \
    --subset heldout-engine --jobs "$jobs"
  mark synth
fi

if ! done_stamp prepare; then
  say "3/8 prepare: manifests, character tokenizer, feature statistics, word 3-gram LM"
  run "$asr" prepare --librispeech-root "$corpus" --subsets train,heldout-sentences,heldout-engine \
    --out "$manifests" --jobs "$jobs"
  run "$asr" tokenizer --manifest "$manifests/train.jsonl" --kind char --vocab-size 64 \
    --out "$data/tokenizer.model"
  # A 3 s sliding mean on top of the global statistics: levels and channels matter less.
  run "$asr" cmvn --manifest "$manifests/train.jsonl" --window 300 --out "$data/cmvn.json" \
    --jobs "$jobs"
  mark prepare
fi
# Words of the training sentences only, so it cannot know the held-out ones; what it adds is
# spelling: the acoustic model gets most characters of an unheard voice right and the LM turns
# them into words. (Outside step 3's stamp: a WORK prepared before the demo had one gets it.)
[[ -f $data/lm.arpa ]] || run "$asr" lm ngram --text "$work/text/train.txt" --order 3 \
  --out "$data/lm.arpa"

if ! done_stamp train; then
  say "4/8 train: BiLSTM-CTC (cpu-small preset), $epochs epochs; the longest step (~10 min on 2 cores)"
  # A short run: a short warmup, small batches (more updates), no SpecAugment (it slows the
  # first epochs down). 30 % of the utterances go through signal augmentation (noise, reverb,
  # equalizer, channel, gain, pitch), 30 % get VTLP; with the sliding-window CMVN this took
  # the held-out engine from 94 % to 74 % WER in the same 12 epochs
  # (recipes/synthetic/README.md).
  run "$asr" train --exp-dir "$exp" --model ctc --preset cpu-small \
    --train "$manifests/train.jsonl" --dev "$manifests/heldout-sentences.jsonl" \
    --tokenizer "$data/tokenizer.model" --cmvn "$data/cmvn.json" --epochs "$epochs" \
    --set max_frames=4000 --set warmup_steps=50 --set lr=3e-3 --set spec_augment=null \
    --set 'augment={}'
  mark train
fi

if ! done_stamp export; then
  say "5/8 export: average the last checkpoints into a self-describing bundle"
  # The LM's weight and length bonus, recorded in the bundle (the server and asr decode use
  # them): chosen on the held-out sentences (the dev set) with six demo-sized models
  # (recipes/synthetic/README.md); the library default 0.3 / 1.0 suits the recipe's larger text.
  run "$asr" export --exp-dir "$exp" --average 3 --out "$bundle" --lm "$data/lm.arpa" \
    --lm-weight 1.2 --length-bonus 2.0
  mark export
fi
if [[ ${#reused[@]} -gt 0 ]]; then
  say "reusing ${reused[*]} from $work (make demo DEMO_ARGS=--fresh starts over)"
fi

# The streamed utterance: the longest held-out sentence, by the held-out engine.
row=$("$python" - "$manifests/heldout-engine.jsonl" <<'EOF'
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
row = max(rows, key=lambda r: len(r["text"].split()))  # the first of the longest
print(row["path"], row["text"], sep="\t")
EOF
)
clip=${row%%$'\t'*} reference=${row#*$'\t'}
cp "$clip" "$work/heldout.flac"  # a stable path for docker/docker-compose.yml's client

say "6/8 serve: asr serve --model demo=$bundle"
server_log=$work/server.log
server_pid=
stop_server() {
  if [[ -n $server_pid ]] && kill -0 "$server_pid" 2>/dev/null; then
    echo "stopping the server (pid $server_pid)"
    kill -TERM "$server_pid" 2>/dev/null || true
    wait "$server_pid" 2>/dev/null || true
  fi
  server_pid=
}
trap stop_server EXIT
trap 'exit 130' INT TERM  # the EXIT trap still stops the server
"$asr" serve --model "demo=$bundle" --lm "demo=$data/lm.arpa" --port "$port" > "$server_log" 2>&1 &
server_pid=$!
# The port comes from the server's first line (so --port 0 works and a busy port fails loudly).
target=
for _ in $(seq 600); do
  if line=$(grep -m1 -o 'listening on [^ ]*' "$server_log"); then target=${line#listening on }; break; fi
  kill -0 "$server_pid" 2>/dev/null || break
  sleep 0.2
done
if [[ -z $target ]]; then
  echo "the server did not start; its log ($server_log):" >&2
  cat "$server_log" >&2
  exit 1
fi
run "$python" -m asr.healthcheck --server "$target" --wait 60

say "7/8 stream: a held-out sentence by the held-out engine (festival HTS), at real-time pace"
echo "reference: $reference"
run "$asr" client --server "$target" --model demo --stream --realtime "$work/heldout.flac"
stop_server

say "8/8 score: WER on the held-out sentences (training voices, then the held-out engine), without and with the LM"
for set in heldout-sentences heldout-engine; do
  for lm in "" "$data/lm.arpa"; do
    out=$("$asr" decode --model "$bundle" --manifest "$manifests/$set.jsonl" ${lm:+--lm "$lm"} \
      --out "$work/decode/$set${lm:+-lm}" --name "$set" 2>&1) || { echo "$out" >&2; exit 1; }
    tail -n 1 <<< "$out"  # the summary line; errors.txt beside it lists the worst utterances
  done
done

say "done in $(( $(date +%s) - start )) s; what was built is in $work"
printf '  %s\n' "${times[@]}"
cat <<EOF
  serve it:     $asr serve --model demo=$bundle --lm demo=$data/lm.arpa
  stream to it: $asr client --stream --realtime $work/heldout.flac
  in Docker:    docker compose -f docker/docker-compose.yml up --build --exit-code-from client
  start over:   make demo DEMO_ARGS=--fresh
EOF
