#!/usr/bin/env bash
# Synthetic LibriSpeech-format corpus from TTS voices, then the LibriSpeech recipe on it with the
# cpu-small presets. Runs on a CPU-only machine; shows the whole pipeline without LibriSpeech.
# Whole engines are held out, so the test sets measure speech recognition, not memory of a
# synthesizer: a festival HTS voice and a flite voice never heard in training, and 17 real
# LibriSpeech utterances (../shared/data, test only). pocketsphinx decodes every test set too.
#
# Usage:
#   recipes/synthetic/run.sh                                  # both models, default text
#   recipes/synthetic/run.sh --model ctc --train-sentences 400 --epochs 5 --work /tmp/synth
#   recipes/synthetic/run.sh --stage 2 --model las            # reuse the corpus, train LAS only
#
# Stages:
#   0 split   text -> train / dev / test sentences (every 20th line test, every 20th+10 dev)
#   1 synth   asr synth: train voices (espeak-ng, flite, festival diphone) speak the train
#             sentences; a few of them, one or two per engine, the dev and test sentences
#             (heldout-sentences); voices of held-out engines speak the test sentences
#             (heldout-festival: cmu_us_slt_arctic_hts; heldout-flite: slt, whose speaker is
#             slt-hts's, so no slt voice trains); manifests of the real utterances
#   2+        recipes/librispeech/run.sh --data-root WORK/LibriSpeech --preset cpu-small ...
#             (prepare, tokenizer, cmvn with a 3 s sliding window, train with on-the-fly
#             augmentation: speed, SpecAugment, and noise, reverb, channel, pitch, VTLP
#             (--no-augment: speed and SpecAugment only), export, decode; results in
#             EXP/results.json). The LAS trains with its CTC head at 80 ms, then
#             fine-tunes with it at 40 ms and CTC weight 0.5 (learning to attend and to align
#             at 40 ms at once fails from scratch); then both models together (rescore and
#             joint), pocketsphinx on every test set (bench/peer_wer.py, the peer row), and
#             the WER table. With both models and 2+ cores the two train at once, each on
#             half the cores (logs in EXP/ctc.log and EXP/las.log)
#   9 lm      an LSTM LM (cpu-small) and a word 3-gram on the training sentences (+ --lm-text),
#             never the test sentences (recipes/librispeech/run.sh stage 6), in WORK/exp/lm
#   10 lm-decode  each LM, and both as a mix, fused into the BiLSTM-CTC's beam search and the
#             LAS's joint decoding, weights chosen on dev (stage 7 there): rows beam+lstm,
#             beam+ngram, beam+mix, joint+...,
#             and for the LAS also with its internal LM subtracted (joint+lstm-ilm, ...)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)

stage=0
stop_stage=100
text=$repo/../shared/data/text/librispeech-mini.txt
model=both
work=$repo/exp/synthetic
# Training voices: formant (espeak-ng, Klatt variants too), diphone (flite, festival) synthesis.
train_voices=espeak:en-us+m1,espeak:en-us+m3,espeak:en-us+m6,espeak:en-us+f1,espeak:en-us+f4
train_voices+=,espeak:en-gb+m3,espeak:en-gb+f2,espeak:en-gb-x-rp+m5,espeak:en-029+m7
train_voices+=,espeak:en-us+klatt,espeak:en-us+klatt4,espeak:en-gb+klatt2
train_voices+=,flite:awb,flite:rms,flite:kal16,festival:kal_diphone,festival:ked_diphone
dev_voices=espeak:en-us+m1,espeak:en-us+klatt,flite:awb,festival:kal_diphone,festival:ked_diphone
heldout_festival=festival:cmu_us_slt_arctic_hts
heldout_flite=flite:slt
real_root=$repo/../shared/data/librispeech-real/LibriSpeech  # test only: never trained on
train_sentences=0           # training sentences (0: all)
voices_per_sentence=2       # training voices reading each sentence (empty: all of them)
max_words=50                # longer sentences are left out (about 5 % of LibriSpeech's)
jobs=$(nproc)
vocab_size=128
epochs=                     # empty: 7 for ctc, 5 for las (+1 fine-tuning)
cmvn_window=300             # frames of sliding-window mean normalisation (0: global CMVN only)
augment=(--augment)         # signal augmentation of the training audio (asr.data.augment)
lm_text=                    # more LM training text, comma-separated (never test sentences)
lm_weights=0.2,0.4,0.6,0.8  # LSTM LM weights tried on dev (0.2 best for the LAS, 0.8 for the BiLSTM-CTC)
# 3-gram weights tried on dev, W:B with length bonus B per unit. On the demo's 161 words
# 1.2:2.0 won for six models; on this corpus (8,263 words, many held-out words unseen) larger
# weights delete words: dev WER 39.4 % at 0.3, 39.9 % at 0.5:2.0, 41.9 % at 0.5, 45.4 % at
# 0.8:2.0, 47.6 % at 0.8:4.0, 60.3 % at 1.2:2.0 (2026-12-07, the default BiLSTM-CTC)
ngram_weights=0.3,0.5:2.0
mix_weights=0.8,1.0,1.25    # both LMs together, each at half its best weight, scaled by these
ilm_weights=0.1,0.2         # internal-LM weights tried with each, for the LAS (empty: none)

while [[ $# -gt 0 ]]; do
  case "$1" in
    --stage) stage=$2; shift 2 ;;
    --stop-stage) stop_stage=$2; shift 2 ;;
    --text) text=$2; shift 2 ;;
    --model) model=$2; shift 2 ;;
    --work) work=$2; shift 2 ;;
    --train-voices) train_voices=$2; shift 2 ;;
    --dev-voices) dev_voices=$2; shift 2 ;;
    --heldout-festival) heldout_festival=$2; shift 2 ;;
    --heldout-flite) heldout_flite=$2; shift 2 ;;
    --real-root) real_root=$2; shift 2 ;;
    --train-sentences) train_sentences=$2; shift 2 ;;
    --voices-per-sentence) voices_per_sentence=$2; shift 2 ;;
    --max-words) max_words=$2; shift 2 ;;
    --jobs) jobs=$2; shift 2 ;;
    --vocab-size) vocab_size=$2; shift 2 ;;
    --epochs) epochs=$2; shift 2 ;;
    --cmvn-window) cmvn_window=$2; shift 2 ;;
    --no-augment) augment=(); shift ;;
    --lm-text) lm_text=$2; shift 2 ;;
    --lm-weights) lm_weights=$2; shift 2 ;;
    --ngram-weights) ngram_weights=$2; shift 2 ;;
    --mix-weights) mix_weights=$2; shift 2 ;;
    --ilm-weights) ilm_weights=$2; shift 2 ;;
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

test_sets=heldout-sentences,heldout-festival,heldout-flite
if in_stage 1; then
  run asr synth --text "$text_dir/train.txt" --voices "$train_voices" --out "$corpus" \
    --subset train-synth --jobs "$jobs" --rate-jitter 0.1 --pitch-jitter 10 \
    ${voices_per_sentence:+--voices-per-sentence "$voices_per_sentence"}
  run asr synth --text "$text_dir/dev.txt" --voices "$dev_voices" --out "$corpus" \
    --subset dev-synth --jobs "$jobs"
  run asr synth --text "$text_dir/test.txt" --voices "$dev_voices" --out "$corpus" \
    --subset heldout-sentences --jobs "$jobs"
  run asr synth --text "$text_dir/test.txt" --voices "$heldout_festival" --out "$corpus" \
    --subset heldout-festival --jobs "$jobs"
  run asr synth --text "$text_dir/test.txt" --voices "$heldout_flite" --out "$corpus" \
    --subset heldout-flite --jobs "$jobs"
fi
# The real utterances are one more test set when they are there: their speakers (unique across
# the three subsets they come from) are linked into one subset of the corpus, so the recipe
# prepares and decodes it like the others. Links, not copies: the audio stays in ../shared.
if [[ -d $real_root ]]; then
  test_sets+=,librispeech-real
  if in_stage 1; then
    mkdir -p "$corpus/librispeech-real"
    for speaker in "$real_root"/*/*/; do
      run ln -sfn "$(cd "$speaker" && pwd)" "$corpus/librispeech-real/$(basename "$speaker")"
    done
  fi
fi

# Measured 2026-12-03 on the 2-core machine with both models training at once on one core
# each, two voices per sentence (9.4 h, augmentation): BiLSTM-CTC about 13 min per epoch, LAS
# about 20 min per epoch; the CTC's 7 epochs took 110 min when other jobs shared the machine.
# The LAS learns to attend only after about 1,200-1,400 optimizer steps at a high learning
# rate (attention accuracy 0.7, dev WER 61 % by step 1,405 with 468 steps per epoch on the
# 3-voice corpus of 2026-12-02), and 4 epochs of this corpus are 1,262 steps: dev WER 108 %
# (recipes/synthetic/README.md). 5 epochs (1,575 steps) + 1 fine-tuning fit the CTC's time.
declare -A default_epochs=([ctc]=7 [las]=5)
finetune_epochs=1
models=("$model")
[[ $model == both ]] && models=(ctc las)

# train MODEL FIRST: the LibriSpeech recipe's stages FIRST..stop_stage-2 for one model.
train() {
  local m=$1 first=$2
  local last=$(( stop_stage - 2 < 5 ? stop_stage - 2 : 5 ))  # the LM stages come after both
  local common=(--data-root "$corpus" --train-sets train-synth --dev-set dev-synth
    --test-sets "$test_sets" --model "$m" --preset cpu-small --vocab-size "$vocab_size"
    --data-dir "$work/data" --average 3 --jobs "$jobs" --cmvn-window "$cmvn_window"
    "${augment[@]}")
  if [[ $m == ctc ]]; then
    run "$repo/recipes/librispeech/run.sh" --stage "$first" --stop-stage "$last" \
      "${common[@]}" --exp-dir "$work/exp/ctc" --epochs "${epochs:-${default_epochs[$m]}}" \
      -- --set valid_max_utterances=300
    return
  fi
  # LAS: train and export the 80 ms model (stages 2-6), then fine-tune it (stages 5-7 again).
  if [[ $first -le 4 ]]; then
    run "$repo/recipes/librispeech/run.sh" --stage "$first" \
      --stop-stage $(( stop_stage - 2 < 4 ? stop_stage - 2 : 4 )) "${common[@]}" \
      --exp-dir "$work/exp/las-base" --epochs "${epochs:-${default_epochs[$m]}}" \
      -- --set valid_max_utterances=300
  fi
  if [[ $stop_stage -ge 5 ]]; then
    run "$repo/recipes/librispeech/run.sh" --stage $(( first > 3 ? first : 3 )) \
      --stop-stage "$last" "${common[@]}" --exp-dir "$work/exp/las" \
      --epochs "$finetune_epochs" -- --init "$work/exp/las-base/bundle" \
      --model-set ctc_upsample=2 --model-set ctc_weight=0.5 \
      --set lr=5e-4 --set warmup_steps=100 --set valid_max_utterances=300
  fi
}

# The peer: pocketsphinx (CMU, generic US English model) on the same test audio.
peer() {
  local peer_args=() tests t
  IFS=, read -ra tests <<< "$test_sets"
  for t in "${tests[@]}"; do peer_args+=(--manifest "$t=$work/data/manifests/$t.jsonl"); done
  run python "$repo/bench/peer_wer.py" "${peer_args[@]}" --results "$work/exp/peer/results.json" \
    --jobs "$jobs"
}

first=$(( stage > 2 ? stage - 2 : 0 ))
peer_done=
if [[ $stage -gt 7 ]]; then
  :  # only the stages after training and decoding
elif [[ $stop_stage -ge 2 && ${#models[@]} -eq 2 && $jobs -ge 2 && $stop_stage -ge 5 ]]; then
  # Both models train at once, each on half the cores: on the 2-core machine one job ran only
  # about 1.4x faster on two threads than on one (BiLSTM-CTC, comparing runs of 2026-12-02),
  # so two at once should finish sooner than one after the other. The corpus-level stages (prepare, tokenizer, cmvn) run first, once. The peer
  # runs after the BiLSTM-CTC, which finishes first, while the LAS trains on. Each job logs
  # to EXP/<model>.log.
  if [[ $first -lt 3 ]]; then
    (stop_stage=4; train ctc "$first")
    first=3
  fi
  mkdir -p "$work/exp"
  half=$(( jobs / 2 ))
  pids=()
  for m in ctc las; do
    (
      export OMP_NUM_THREADS=$half
      jobs=$half
      train "$m" "$first"
      if [[ $m == ctc && $stop_stage -ge 8 ]]; then peer; fi
    ) > "$work/exp/$m.log" 2>&1 &
    pids+=($!)
    echo "training $m in the background (OMP_NUM_THREADS=$half): log $work/exp/$m.log"
  done
  failed=0
  for i in 0 1; do
    if ! wait "${pids[$i]}"; then
      failed=1
      echo "${models[$i]} failed; the end of $work/exp/${models[$i]}.log:" >&2
      tail -n 20 "$work/exp/${models[$i]}.log" >&2
    fi
  done
  [[ $failed -eq 0 ]] || exit 1
  [[ $stop_stage -ge 8 ]] && peer_done=1
elif [[ $stop_stage -ge 2 ]]; then
  for m in "${models[@]}"; do
    # The corpus-level stages (prepare, tokenizer, cmvn) are shared; run them once.
    if [[ $m != "${models[0]}" && $first -lt 3 ]]; then train "$m" 3; else train "$m" "$first"; fi
  done
fi
# Both models together (same tokenizer): the BiLSTM-CTC n-best rescored by the LAS attention
# decoder, and one-pass joint decoding (LAS attention beam search scored with the BiLSTM-CTC's
# prefix probabilities; CTC weight 0.2, chosen on 300 dev utterances).
results=()
if in_stage 7 && [[ -d $work/exp/las/bundle && -d $work/exp/ctc/bundle ]]; then
  run "$repo/recipes/librispeech/run.sh" --stage 5 --stop-stage 5 \
    --test-sets "$test_sets" --model ctc --data-dir "$work/data" \
    --exp-dir "$work/exp/ctc" --methods rescore,joint --ctc-weight 0.2 \
    --rescore-model "$work/exp/las/bundle"
fi
if in_stage 8 && [[ -z $peer_done ]]; then
  peer
fi
# The LM: one for both models (same tokenizer), then each model decodes with it.
if [[ $stop_stage -ge 9 && $stage -le 10 ]]; then
  lm_args=(--data-dir "$work/data" --dev-set dev-synth --test-sets "$test_sets"
    --lm-dir "$work/exp/lm" --lm-preset cpu-small --lm-text "$lm_text" --lm-weights "$lm_weights"
    --ngram-weights "$ngram_weights" --mix-weights "$mix_weights" --ilm-weights "$ilm_weights")
  if in_stage 9; then
    run "$repo/recipes/librispeech/run.sh" --stage 6 --stop-stage 6 "${lm_args[@]}"
  fi
  if in_stage 10; then
    for m in "${models[@]}"; do
      run "$repo/recipes/librispeech/run.sh" --stage 7 --stop-stage 7 "${lm_args[@]}" \
        --model "$m" --exp-dir "$work/exp/$m" --ctc-weight 0.2
    done
  fi
fi
for r in ctc las peer; do
  [[ -f $work/exp/$r/results.json ]] && results+=("$work/exp/$r/results.json")
done
if [[ $stop_stage -ge 7 && ${#results[@]} -gt 0 ]]; then
  run asr results "${results[@]}"
fi
