#!/usr/bin/env bash
# Synthetic LibriSpeech-format corpus from TTS voices, then the LibriSpeech recipe on it with the
# cpu-small presets. Runs on a CPU-only machine; shows the whole pipeline without LibriSpeech.
#
# Usage:
#   recipes/synthetic/run.sh                                  # both models, default text
#   recipes/synthetic/run.sh --model ctc --train-sentences 400 --epochs 5 --work /tmp/synth
#   recipes/synthetic/run.sh --stage 2 --model las            # reuse the corpus, train LAS only
#
# Stages:
#   0 split   text -> train / dev / test sentences (every 20th line test, every 20th+10 dev)
#   1 synth   asr synth: train voices speak train and dev sentences; the same voices speak the
#             test sentences (heldout-sentences); a voice never used in training speaks them
#             too (heldout-voice)
#   2+        recipes/librispeech/run.sh --data-root WORK/LibriSpeech --preset cpu-small ...
#             (prepare, tokenizer, cmvn, train, export, decode; results in EXP/results.json),
#             then both models together (rescore and joint, BiLSTM-CTC with the LAS bundle),
#             and the WER table
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)

stage=0
stop_stage=100
text=$repo/../shared/data/text/librispeech-mini.txt
model=both
work=$repo/exp/synthetic
train_voices=espeak:en-us+m1,espeak:en-us+f1,espeak:en-gb+m3,espeak:en-us+m7,flite:slt,flite:awb,flite:rms
heldout_voice=espeak:en-us+f3
train_sentences=0           # training sentences (0: all)
voices_per_sentence=2       # training voices reading each sentence (empty: all of them)
max_words=50                # longer sentences are left out (about 5 % of LibriSpeech's)
jobs=$(nproc)
vocab_size=128
epochs=                     # empty: 11 for ctc, 8 for las (about 80 min each on one core)

while [[ $# -gt 0 ]]; do
  case "$1" in
    --stage) stage=$2; shift 2 ;;
    --stop-stage) stop_stage=$2; shift 2 ;;
    --text) text=$2; shift 2 ;;
    --model) model=$2; shift 2 ;;
    --work) work=$2; shift 2 ;;
    --train-voices) train_voices=$2; shift 2 ;;
    --heldout-voice) heldout_voice=$2; shift 2 ;;
    --train-sentences) train_sentences=$2; shift 2 ;;
    --voices-per-sentence) voices_per_sentence=$2; shift 2 ;;
    --max-words) max_words=$2; shift 2 ;;
    --jobs) jobs=$2; shift 2 ;;
    --vocab-size) vocab_size=$2; shift 2 ;;
    --epochs) epochs=$2; shift 2 ;;
    -h|--help) sed -n '2,/^set -euo/{/^set/!p}' "$0"; exit 0 ;;
    *) echo "unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done

run() { echo "+ $*"; "$@"; }
in_stage() { [[ $stage -le $1 && $stop_stage -ge $1 ]]; }
text_dir=$work/text
corpus=$work/LibriSpeech

if in_stage 0; then
  [[ -f $text ]] || { echo "$text: text file not found (pass --text)" >&2; exit 2; }
  mkdir -p "$text_dir"
  # Lines are `ID TEXT` or plain sentences; the word limit counts words after a leading ID.
  awk -v max="$max_words" -v dir="$text_dir" '
    { n = NF; if ($1 ~ /[0-9]-[0-9]/) n-- }
    n == 0 || n > max { next }
    { k++; f = (k % 20 == 0) ? "test" : (k % 20 == 10) ? "dev" : "train"; print > (dir "/" f ".txt") }
  ' "$text"
  if [[ $train_sentences -gt 0 ]]; then
    head -n "$train_sentences" "$text_dir/train.txt" > "$text_dir/train.limited.txt"
    mv "$text_dir/train.limited.txt" "$text_dir/train.txt"
  fi
  wc -l "$text_dir"/*.txt
fi

if in_stage 1; then
  run asr synth --text "$text_dir/train.txt" --voices "$train_voices" --out "$corpus" \
    --subset train-synth --jobs "$jobs" --rate-jitter 0.1 --pitch-jitter 10 \
    ${voices_per_sentence:+--voices-per-sentence "$voices_per_sentence"}
  run asr synth --text "$text_dir/dev.txt" --voices "$train_voices" --out "$corpus" \
    --subset dev-synth --jobs "$jobs"
  run asr synth --text "$text_dir/test.txt" --voices "$train_voices" --out "$corpus" \
    --subset heldout-sentences --jobs "$jobs"
  run asr synth --text "$text_dir/test.txt" --voices "$heldout_voice" --out "$corpus" \
    --subset heldout-voice --jobs "$jobs"
fi

declare -A default_epochs=([ctc]=11 [las]=8)
models=("$model")
[[ $model == both ]] && models=(ctc las)
for m in "${models[@]}"; do
  # The corpus-level stages (prepare, tokenizer, cmvn) are shared; run them once.
  first=$(( stage > 2 ? stage - 2 : 0 ))
  [[ $m != "${models[0]}" && $first -lt 3 ]] && first=3
  if [[ $stop_stage -ge 2 ]]; then
    run "$repo/recipes/librispeech/run.sh" --stage "$first" --stop-stage $(( stop_stage - 2 )) \
      --data-root "$corpus" --train-sets train-synth --dev-set dev-synth \
      --test-sets heldout-sentences,heldout-voice --model "$m" --preset cpu-small \
      --vocab-size "$vocab_size" --data-dir "$work/data" --exp-dir "$work/exp/$m" \
      --average 3 --jobs "$jobs" --epochs "${epochs:-${default_epochs[$m]}}" \
      -- --set valid_max_utterances=300
  fi
done
# Both models together (same tokenizer): the BiLSTM-CTC n-best rescored by the LAS attention
# decoder, and one-pass joint decoding (LAS attention beam search scored with the BiLSTM-CTC's
# prefix probabilities; CTC weight 0.2, chosen on 300 dev utterances).
if [[ $stop_stage -ge 7 && -d $work/exp/las/bundle && -d $work/exp/ctc/bundle ]]; then
  run "$repo/recipes/librispeech/run.sh" --stage 5 --stop-stage 5 \
    --test-sets heldout-sentences,heldout-voice --model ctc --data-dir "$work/data" \
    --exp-dir "$work/exp/ctc" --methods rescore,joint --ctc-weight 0.2 \
    --rescore-model "$work/exp/las/bundle"
  run asr results "$work/exp/ctc/results.json" "$work/exp/las/results.json"
fi
