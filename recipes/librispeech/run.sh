#!/usr/bin/env bash
# LibriSpeech recipe: BiLSTM-CTC or Listen-Attend-Spell with sentencepiece units.
# Works unchanged on any corpus in the LibriSpeech layout (see ../synthetic/run.sh).
#
# Usage:
#   recipes/librispeech/run.sh --data-root /data/LibriSpeech --model ctc --preset librispeech-100h --ngpu 4
#   recipes/librispeech/run.sh --data-root /data/LibriSpeech --model las --preset librispeech-960h \
#       --train-sets train-clean-100,train-clean-360,train-other-500 --vocab-size 5000 --ngpu 8
#   recipes/librispeech/run.sh ... --stage 3 --stop-stage 3      # one stage only
#
# Stages (each is one command; they are printed as they run, copy them to run by hand):
#   0 prepare    asr prepare --librispeech-root ROOT --subsets SETS --out DATA/manifests
#   1 tokenizer  asr tokenizer --manifest DATA/manifests/train.jsonl --kind unigram --vocab-size V --out DATA/tokenizer.model
#   2 cmvn       asr cmvn --manifest DATA/manifests/train.jsonl --window W --out DATA/cmvn.json
#   3 train      torchrun --nproc_per_node=NGPU -m asr.cli train --exp-dir EXP --model M --preset P ...
#   4 export     asr export --exp-dir EXP --average N --out EXP/bundle
#   5 decode     asr decode --model EXP/bundle --manifest DATA/manifests/TEST.jsonl --method M \
#                    --beam 10 --out EXP/decode/M/TEST --results EXP/results.json
#                for each method (ctc: greedy, beam, streaming, and with --rescore-model LAS_BUNDLE
#                rescore and joint; las: greedy, beam, joint, rescore), then `asr results`
#                prints the WER table
#   6 lm         asr lm text DATA/manifests/train.jsonl LM_TEXT... --exclude TEST... --unique --out LM/text.txt
#                asr lm train --exp-dir LM --preset LM_PRESET --train LM/text.txt --dev DEV ...
#                asr lm export --exp-dir LM --out LM/bundle      (one LSTM LM for every model)
#                asr lm ngram --text LM/text.txt --order 3 --out LM/3gram.arpa   (a word 3-gram)
#   7 lm-decode  asr decode ... --lm LM/bundle --lm-weight W --length-bonus W*ln(LM dev perplexity)
#                on DEV for each W of --lm-weights (and --lm LM/3gram.arpa --length-bonus
#                NGRAM_BONUS for --ngram-weights; an entry W:B sets the bonus B itself),
#                then on every test set with the best W (rows METHOD+lstm, METHOD+ngram);
#                asr lm mix --part LM/bundle W1/2 --part LM/3gram.arpa W2/2 --out EXP/decode/METHOD+mix/mix.json
#                (both LMs at half their best weights), decoded the same way at each
#                weight of --mix-weights, which scale it (row METHOD+mix);
#                where an attention decoder searches, also each W with each --ilm-weights
#                IW (--ilm-weight IW subtracts its internal LM; rows METHOD+lstm-ilm, ...);
#                asr export --lm BEST --lm-weight W --length-bonus B --out EXP/bundle-lm
#                (confidences calibrated for serving with the LM, LSTM, 3-gram or mix, that did
#                best on dev, which it then fuses at W, B; EXP/bundle-lm.txt names it)
# Export comes before decode so the numbers are those of the bundle users get.
set -euo pipefail

stage=0
stop_stage=100
data_root=
model=ctc
preset=librispeech-100h
ngpu=0                      # 0: one process (CPU or one GPU); N: torchrun over N GPUs (DDP)
train_sets=train-clean-100
dev_set=dev-clean
test_sets=test-clean,test-other
tokenizer_kind=unigram
vocab_size=300
data_dir=data
exp_dir=
average=5
epochs=                     # empty: the preset's
methods=                    # decode stage; empty: greedy,beam,streaming (ctc), greedy,beam,joint,rescore (las)
beam=10
rescore_model=              # a LAS bundle: adds "rescore" and "joint" (both models) to a ctc model's methods
ctc_weight=                 # decode stage: CTC weight of joint and rescore (empty: 0.3)
jobs=$(nproc)
cmvn_window=0               # frames of causal sliding-window mean normalisation (0: global CMVN only)
augment=0                   # 1: noise, reverb, channel, pitch and VTLP augmentation (asr.data.augment)
noise_dir=                  # recorded noise for augmentation (e.g. MUSAN's noise/); implies --augment
rir_dir=                    # measured room impulse responses instead of simulated; implies --augment
lm_dir=                     # LM experiment and bundle (empty: DATA/lm)
lm_preset=librispeech       # asr lm train preset (cpu-small on a CPU)
lm_text=                    # more LM text, comma-separated (e.g. librispeech-lm-norm.txt)
lm_epochs=                  # empty: the LM preset's
lm_weights=0.1,0.2,0.3,0.5  # stage 7 tries these LSTM LM weights on DEV and keeps the best
ngram_weights=0.3,0.6,0.8:2.0,1.2:2.0  # ... and these 3-gram weights (W:B: with length bonus B)
ngram_bonus=1.0             # length bonus per unit with a 3-gram weight that names none
mix_weights=0.8,1.0,1.25    # ... and these weights of both LMs together, each at half its best
ilm_weights=0.1,0.2,0.3     # ... and these internal-LM weights with each LM weight, where an
                            # attention decoder searches (empty: no METHOD+KIND-ilm rows)
lm_methods=                 # stage 7 methods; empty: beam (ctc; joint too with --rescore-model), joint (las)
train_args=()               # extra `asr train` arguments after --, e.g. -- --set lr=5e-4

while [[ $# -gt 0 ]]; do
  case "$1" in
    --stage) stage=$2; shift 2 ;;
    --stop-stage) stop_stage=$2; shift 2 ;;
    --data-root) data_root=$2; shift 2 ;;
    --model) model=$2; shift 2 ;;
    --preset) preset=$2; shift 2 ;;
    --ngpu) ngpu=$2; shift 2 ;;
    --train-sets) train_sets=$2; shift 2 ;;
    --dev-set) dev_set=$2; shift 2 ;;
    --test-sets) test_sets=$2; shift 2 ;;
    --tokenizer-kind) tokenizer_kind=$2; shift 2 ;;
    --vocab-size) vocab_size=$2; shift 2 ;;
    --data-dir) data_dir=$2; shift 2 ;;
    --exp-dir) exp_dir=$2; shift 2 ;;
    --average) average=$2; shift 2 ;;
    --ctc-weight) ctc_weight=$2; shift 2 ;;
    --epochs) epochs=$2; shift 2 ;;
    --methods) methods=$2; shift 2 ;;
    --beam) beam=$2; shift 2 ;;
    --rescore-model) rescore_model=$2; shift 2 ;;
    --jobs) jobs=$2; shift 2 ;;
    --cmvn-window) cmvn_window=$2; shift 2 ;;
    --augment) augment=1; shift ;;
    --noise-dir) noise_dir=$2; augment=1; shift 2 ;;
    --rir-dir) rir_dir=$2; augment=1; shift 2 ;;
    --lm-dir) lm_dir=$2; shift 2 ;;
    --lm-preset) lm_preset=$2; shift 2 ;;
    --lm-text) lm_text=$2; shift 2 ;;
    --lm-epochs) lm_epochs=$2; shift 2 ;;
    --lm-weights) lm_weights=$2; shift 2 ;;
    --ngram-weights) ngram_weights=$2; shift 2 ;;
    --ngram-bonus) ngram_bonus=$2; shift 2 ;;
    --mix-weights) mix_weights=$2; shift 2 ;;
    --ilm-weights) ilm_weights=$2; shift 2 ;;
    --lm-methods) lm_methods=$2; shift 2 ;;
    --) shift; train_args=("$@"); break ;;
    -h|--help) sed -n '2,/^set -euo/{/^set/!p}' "$0"; exit 0 ;;
    *) echo "unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done
exp_dir=${exp_dir:-exp/${model}_${preset}}
manifests=$data_dir/manifests
lm_dir=${lm_dir:-$data_dir/lm}
launcher=(asr)               # training commands: under torchrun with --ngpu N > 1
if [[ $ngpu -gt 1 ]]; then launcher=(torchrun --standalone --nproc_per_node="$ngpu" -m asr.cli); fi

run() { echo "+ $*"; "$@"; }
in_stage() { [[ $stage -le $1 && $stop_stage -ge $1 ]]; }

if in_stage 0; then
  [[ -n $data_root ]] || { echo "--data-root is required for stage 0" >&2; exit 2; }
  run asr prepare --librispeech-root "$data_root" --subsets "$train_sets,$dev_set,$test_sets" \
    --out "$manifests" --jobs "$jobs"
  # Several training subsets train as one manifest.
  IFS=, read -ra sets <<< "$train_sets"
  for s in "${sets[@]}"; do cat "$manifests/$s.jsonl"; done > "$manifests/train.jsonl"
fi

if in_stage 1; then
  run asr tokenizer --manifest "$manifests/train.jsonl" --kind "$tokenizer_kind" \
    --vocab-size "$vocab_size" --out "$data_dir/tokenizer.model"
fi

if in_stage 2; then
  run asr cmvn --manifest "$manifests/train.jsonl" --window "$cmvn_window" \
    --out "$data_dir/cmvn.json" --jobs "$jobs"
fi

if in_stage 3; then
  [[ -n $epochs ]] && train_args=(--epochs "$epochs" "${train_args[@]}")
  if [[ $augment == 1 ]]; then
    # Recorded noise joins the generated kinds (coloured, babble); the directories' absolute
    # paths go into the experiment's config.
    spec={}
    if [[ -n $noise_dir || -n $rir_dir ]]; then
      spec=$(python3 -c 'import json, os, sys
noise, rir = sys.argv[1:]
spec = {"noise_dir": os.path.abspath(noise), "noise_kinds": ["white", "pink", "brown", "babble", "file"]} if noise else {}
print(json.dumps(spec | ({"rir_dir": os.path.abspath(rir)} if rir else {})))' "$noise_dir" "$rir_dir")
    fi
    train_args=(--set "augment=$spec" "${train_args[@]}")
  fi
  start=$(date +%s)
  run "${launcher[@]}" train --exp-dir "$exp_dir" --model "$model" --preset "$preset" \
    --train "$manifests/train.jsonl" --dev "$manifests/$dev_set.jsonl" \
    --tokenizer "$data_dir/tokenizer.model" --cmvn "$data_dir/cmvn.json" "${train_args[@]}"
  echo "train wall time: $(( $(date +%s) - start )) s" | tee "$exp_dir/train_time.txt"
fi

if in_stage 4; then
  run asr export --exp-dir "$exp_dir" --average "$average" --out "$exp_dir/bundle"
fi

if in_stage 5; then
  IFS=, read -ra tests <<< "$test_sets"
  if [[ -z $methods ]]; then
    methods=greedy,beam,streaming
    [[ $model == las ]] && methods=greedy,beam,joint,rescore
    [[ $model == ctc && -n $rescore_model ]] && methods=greedy,beam,streaming,rescore,joint
  fi
  IFS=, read -ra method_list <<< "$methods"
  for m in "${method_list[@]}"; do
    # streaming: beam search through the streaming session in 100 ms chunks, as the server
    # runs it (filed as streaming-beam): its gap to beam is what streaming costs.
    extra=(--method "$m")
    [[ $m == streaming ]] && extra=(--method beam --streaming)
    [[ $m =~ ^(rescore|joint)$ && $model == ctc ]] && extra+=(--rescore-model "$rescore_model")
    [[ $m =~ ^(rescore|joint)$ && -n $ctc_weight ]] && extra+=(--ctc-weight "$ctc_weight")
    for t in "${tests[@]}"; do
      run asr decode --model "$exp_dir/bundle" --manifest "$manifests/$t.jsonl" \
        --beam "$beam" "${extra[@]}" \
        --out "$exp_dir/decode/$m/$t" --name "$t" --results "$exp_dir/results.json"
    done
  done
  run asr results "$exp_dir/results.json"
fi

if in_stage 6; then
  # The LM reads the training transcripts and any other text, never the test sets' sentences.
  IFS=, read -ra tests <<< "$test_sets"
  IFS=, read -ra extra_text <<< "$lm_text"
  excludes=()
  for t in "${tests[@]}"; do excludes+=(--exclude "$manifests/$t.jsonl"); done
  run asr lm text "$manifests/train.jsonl" "${extra_text[@]}" "${excludes[@]}" --unique \
    --out "$lm_dir/text.txt"
  run "${launcher[@]}" lm train --exp-dir "$lm_dir" --preset "$lm_preset" \
    --train "$lm_dir/text.txt" --dev "$manifests/$dev_set.jsonl" \
    --tokenizer "$data_dir/tokenizer.model" ${lm_epochs:+--epochs "$lm_epochs"}
  run asr lm export --exp-dir "$lm_dir" --out "$lm_dir/bundle"
  run asr lm ngram --text "$lm_dir/text.txt" --order 3 --out "$lm_dir/3gram.arpa"
fi

if in_stage 7; then
  IFS=, read -ra tests <<< "$test_sets"
  if [[ -z $lm_methods ]]; then
    lm_methods=beam
    [[ $model == las ]] && lm_methods=joint
    [[ $model == ctc && -n $rescore_model ]] && lm_methods=beam,joint
  fi
  IFS=, read -ra method_list <<< "$lm_methods"
  # The LSTM LM's weight W comes with a length bonus of W x its mean cost per unit on dev
  # (ln of its perplexity): fusion then re-ranks hypotheses without favouring shorter ones
  # (without it, the fused searches mostly gained deletions). The 3-gram's is --ngram-bonus.
  # A grid entry W:B names its own bonus B: a larger weight needs a larger bonus to keep the
  # words the acoustic model is unsure of (on the demo's closed 161-word corpus 1.2:2.0 was
  # best; on the synthetic recipe's 8,263 words, with unseen words to charge, 0.3 at bonus 1.0
  # stayed best: recipes/synthetic/README.md), so the grid tries both kinds and dev decides.
  ppl=$(python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))["results"]["dev"]["perplexity"])' "$lm_dir/bundle/config.json")
  # bonus KIND W[:B] -> the length bonus of that grid entry
  bonus() {
    if [[ $2 == *:* ]]; then echo "${2#*:}"
    elif [[ $1 == lstm ]]; then awk -v w="$2" -v p="$ppl" 'BEGIN { printf "%.4f", w * log(p) }'
    elif [[ $1 == mix ]]; then awk -v w="$2" -v b="$mix_bonus" 'BEGIN { printf "%.4f", w * b }'
    else echo "$ngram_bonus"; fi
  }
  declare -A lm_path=([lstm]=$lm_dir/bundle [ngram]=$lm_dir/3gram.arpa)
  declare -A lm_grid=([lstm]=$lm_weights [ngram]=$ngram_weights [mix]=$mix_weights)
  # chosen KIND FIELD -> the LM weight or length bonus tune chose for KIND with method m
  chosen() {
    sed -n "s/.*$2 \([^,]*\),.*/\1/p" "$exp_dir/decode/$m+$1/weight.txt"
  }
  # Both LMs fused together (as ESPnet's --lm_weight beside --ngram_weight): each at half
  # the weight it was best at alone, with half of each one's bonus; --mix-weights scale the
  # pair on dev. On the synthetic recipe both together beat either alone on every test set.
  mix_lms() {
    local dir=$exp_dir/decode/$m+mix
    mkdir -p "$dir"
    run asr lm mix --part "$lm_dir/bundle" "$(awk -v w="$(chosen lstm 'LM weight')" 'BEGIN { print w / 2 }')" \
      --part "$lm_dir/3gram.arpa" "$(awk -v w="$(chosen ngram 'LM weight')" 'BEGIN { print w / 2 }')" \
      --out "$dir/mix.json"
    mix_bonus=$(awk -v a="$(chosen lstm 'length bonus')" -v b="$(chosen ngram 'length bonus')" \
      'BEGIN { printf "%.4f", (a + b) / 2 }')
    lm_path[mix]=$dir/mix.json
  }
  # tune ILM_WEIGHTS: tries every entry W[:B] of the kind's grid with each internal-LM weight
  # of ILM_WEIGHTS (comma-separated) on DEV, then decodes the test sets at the best pair.
  tune() {
    local -a weights ilms
    IFS=, read -ra weights <<< "${lm_grid[$kind]}"
    IFS=, read -ra ilms <<< "$1"
    local best='' best_ilm='' best_wer='' w iw out wer dir=$m+$kind
    [[ $1 != 0 ]] && dir=$m+$kind-ilm
    for w in "${weights[@]}"; do
      for iw in "${ilms[@]}"; do
        out=$exp_dir/decode/$dir/tune/$dev_set-w${w/:/-b}-ilm$iw
        run asr decode --model "$exp_dir/bundle" --manifest "$manifests/$dev_set.jsonl" \
          "${extra[@]}" --lm-weight "${w%%:*}" --length-bonus "$(bonus "$kind" "$w")" \
          --ilm-weight "$iw" --out "$out" --name "$dev_set"
        wer=$(python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))["wer"])' "$out/wer.json")
        if [[ -z $best ]] || awk -v a="$wer" -v b="$best_wer" 'BEGIN { exit !(a < b) }'; then
          best=$w best_ilm=$iw best_wer=$wer
        fi
      done
    done
    echo "$dir: LM weight ${best%%:*}, length bonus $(bonus "$kind" "$best"), ILM weight $best_ilm (dev WER $best_wer %)" \
      | tee "$exp_dir/decode/$dir/weight.txt"
    for t in "${tests[@]}"; do
      run asr decode --model "$exp_dir/bundle" --manifest "$manifests/$t.jsonl" \
        "${extra[@]}" --lm-weight "${best%%:*}" --length-bonus "$(bonus "$kind" "$best")" \
        --ilm-weight "$best_ilm" --out "$exp_dir/decode/$dir/$t" --name "$t" \
        --results "$exp_dir/results.json"
    done
  }
  for m in "${method_list[@]}"; do
    for kind in lstm ngram mix; do
      [[ $kind == mix ]] && mix_lms
      extra=(--method "$m" --beam "$beam" --lm "${lm_path[$kind]}")
      [[ $m =~ ^(rescore|joint)$ && $model == ctc ]] && extra+=(--rescore-model "$rescore_model")
      [[ $m =~ ^(rescore|joint)$ && -n $ctc_weight ]] && extra+=(--ctc-weight "$ctc_weight")
      # The weights are chosen on the dev set, never on a test set: row METHOD+KIND without
      # the internal LM, and where an attention decoder searches (las; rescore and joint with
      # --rescore-model) row METHOD+KIND-ilm with it subtracted (ILME, Meng et al. 2021).
      tune 0
      if [[ -n $ilm_weights && ($model == las || $m =~ ^(rescore|joint)$) ]]; then
        tune "$ilm_weights"
      fi
    done
  done
  run asr results "$exp_dir/results.json"
  # A bundle to serve with the LM (the LSTM LM, the 3-gram or both) that did best on dev for
  # the first method: the same weights, word confidences calibrated on dev decoded with it
  # at the weight chosen (an LM changes what a raw confidence means; asr.calibration). The
  # bundle records that weight and its length bonus, so serving it with the same LM fuses at
  # them (EXP/bundle-lm.txt gives the command): asr serve --model M=EXP/bundle-lm --lm M=LM
  m=${method_list[0]} best_kind=
  lm_path[mix]=$exp_dir/decode/$m+mix/mix.json  # that method's mix (the loop left the last's)
  for kind in lstm ngram mix; do
    wer=$(sed -n 's/.*(dev WER \([^ ]*\) %)/\1/p' "$exp_dir/decode/$m+$kind/weight.txt")
    if [[ -z $best_kind ]] || awk -v a="$wer" -v b="$best_wer" 'BEGIN { exit !(a < b) }'; then
      best_kind=$kind best_wer=$wer
    fi
  done
  run asr export --exp-dir "$exp_dir" --average "$average" --out "$exp_dir/bundle-lm" \
    --lm "${lm_path[$best_kind]}" --lm-weight "$(chosen "$best_kind" 'LM weight')" \
    --length-bonus "$(chosen "$best_kind" 'length bonus')"
  echo "serve it with the LM that did best on dev ($best_kind, dev WER $best_wer %):" \
    "asr serve --model M=$exp_dir/bundle-lm --lm M=${lm_path[$best_kind]}" \
    | tee "$exp_dir/bundle-lm.txt"
fi
