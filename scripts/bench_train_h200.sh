#!/bin/bash
# The training-step targets of issue 30 on one H200, in under 9 minutes: each part one
# scripts/bench_train.py process under its own time limit (and all of them under TOTAL_S), appending
# to one file, $OUT/train_settings_h200.json (DESIGN.md's format; rows carry `setting`):
#   1b     llama3.2-1b at 8K / 32K / 128K, bf16 autocast over fp32 weights: like_for_like (both sides full
#          checkpointing) and fastest_fit (longctx train.activation_checkpoint=auto as the planner
#          resolves it for this GPU; HF + Liger none, else full, its OOM row kept)         ~2 min
#   8b     llama3-8b at 16K (each side's warm-up, a row too) and 128K, bf16 weights: longctx with its
#          AdamW on the host (optim.offload, the one-GPU 8B path), HF + Liger all on the GPU;
#          like_for_like and fastest_fit as above                                           ~4.5 min
#   512k   llama3-8b, one unpacked 524288-token document, fastest_fit: auto resolved for all 32 layers
#          (on 141 GB with a 128 GB host: full checkpointing in groups of 2), timed on a cut of 2 layers
#          and scaled to 32 (the scaled row says layers_timed, scaled_from; an upper bound)  ~1.5 min
#   check  (not in the default list) bench_train.py --check: the offloaded AdamW and grouped checkpointing
#          in bf16 on the GPU                                                                ~1 min
# Estimated from bench/results/train_h200.json and train_8b_128k_h200.json (one step each side at
# 1B 128K: 14.7 s / 13.9 s with full checkpointing; 8B 128K: 60.6 s / 48.7 s; builds 3 s (1B), 19 s (8B)),
# the planner's predictions in bench/results/plan_train_auto_predictions.json.
#   OUT=/tmp/out scripts/bench_train_h200.sh             # every default part
#   OUT=/tmp/out scripts/bench_train_h200.sh 8b 512k     # some parts (appended to the file there is)
set -o pipefail
OUT=${OUT:-/tmp/out}
FILE=$OUT/train_settings_h200.json
PARTS=${*:-1b 8b 512k}
TOTAL_S=${TOTAL_S:-530}
mkdir -p "$OUT"
start=$(date +%s)
# a part's limit: its own, or what is left of TOTAL_S if less
limit() { local left=$(( TOTAL_S - ($(date +%s) - start) )); echo $(( $1 < left ? $1 : (left > 5 ? left : 5) )); }
bench() {   # time limit, bench_train.py arguments...
    local seconds; seconds=$(limit "$1"); shift
    echo "== $seconds s: bench_train.py $*" | tee -a "$OUT/log.txt"
    timeout "$seconds" python3 scripts/bench_train.py --out "$FILE" --append "$@" 2>&1 | tee -a "$OUT/log.txt"
}
BOTH=(--settings like_for_like fastest_fit --impls longctx hf_liger)
LONGCTX_8B=(--model 8b --precisions bf16_pure --offload-optimizer --set model.mlp_chunk_size=8192)
[ -z "${*}" ] && rm -f "$FILE"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee -a "$OUT/log.txt"
free -g | head -2
for part in $PARTS; do
    case $part in
        check) timeout "$(limit 90)" python3 scripts/bench_train.py --check 2>&1 | tee -a "$OUT/log.txt" \
                   || { echo "checks failed: nothing timed"; exit 1; } ;;
        1b) bench 180 --model 1b "${BOTH[@]}" --precisions bf16_autocast --seqlens 8192 32768 131072 \
                --warmup 1 --steps 1 ;;
        8b) bench 300 "${LONGCTX_8B[@]}" "${BOTH[@]}" --seqlens 16384 131072 --warmup 0 --steps 1 ;;
        512k) bench 120 "${LONGCTX_8B[@]}" --settings fastest_fit --impls longctx --seqlens 524288 \
                  --layers 2 --scale --warmup 0 --steps 1 ;;
        *) echo "unknown part $part (1b 8b 512k check)"; exit 2 ;;
    esac
done
echo "total $(( $(date +%s) - start )) s; rows in $FILE"
