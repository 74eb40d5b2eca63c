#!/bin/bash
# bench/results/train_8b_h200.json: the one-GPU rows of issue 21 (the 8B shape with the offloaded
# optimizer and with LoRA, checkpoint groups, the 1B shape at 1M, HF + Liger at 8B): the bf16 checks
# first (nothing is timed if they fail), then each part as its own scripts/bench_train.py process under
# its own time limit, appending to one file. All parts take about 13 minutes, more than one device
# call may: name the parts of each call.
#   scripts/bench_train_8b_h200.sh                 # every part
#   scripts/bench_train_8b_h200.sh lora llama1b    # some parts (appended to the file there is)
# One step each, no warm-up (the first row of a process includes the kernels' compilation; the HF
# row at 16K is HF's warm-up); longctx with the blockwise MLP in chunks of 8K.
set -o pipefail
OUT=${OUT:-/tmp/out}
FILE=$OUT/train_8b_h200.json
PARTS=${*:-check full full512k lora1m lora64k lora128k lora512k llama1b hf}
mkdir -p "$OUT"
start=$(date +%s)
left() { local s=$(( $1 - ($(date +%s) - start) )); echo $(( s > 10 ? s : 10 )); }
bench() {   # time limit, bench_train.py arguments...
    local limit=$1; shift
    timeout "$limit" python3 scripts/bench_train.py --warmup 0 --steps 1 --out "$FILE" --append "$@" 2>&1 \
        | tee -a "$OUT/log.txt"
}
LONGCTX_8B=(--model 8b --impls longctx --precisions bf16_pure --offload-optimizer --set model.mlp_chunk_size=8192)
free -g | head -2
[ -z "${*}" ] && rm -f "$FILE"
for part in $PARTS; do
    case $part in
        check) timeout 90 python3 scripts/bench_train.py --check 2>&1 | tee -a "$OUT/log.txt" \
                   || { echo "checks failed: nothing timed"; exit 1; } ;;
        full) bench 170 "${LONGCTX_8B[@]}" --seqlens 65536 131072 ;;
        full512k) bench 150 "${LONGCTX_8B[@]}" --seqlens 524288 --checkpoint-group 4 --documents-of 8192 ;;
        lora1m) bench 70 "${LONGCTX_8B[@]}" --lora --seqlens 1048576 --layers 4 --checkpoint-group 2 \
                    --activation-offload --documents-of 8192 ;;
        lora64k) bench 60 "${LONGCTX_8B[@]}" --lora --seqlens 65536 ;;
        lora128k) bench 120 "${LONGCTX_8B[@]}" --lora --seqlens 131072 ;;
        lora512k) bench 170 "${LONGCTX_8B[@]}" --lora --seqlens 524288 --checkpoint-group 4 --documents-of 8192 ;;
        llama1b) bench 70 --model 1b --impls longctx --precisions bf16_autocast --set model.mlp_chunk_size=8192 \
                     --seqlens 1048576 --documents-of 8192 ;;
        hf) bench "$(left 590)" --model 8b --impls hf_liger --precisions bf16_pure --seqlens 16384 131072 ;;
        *) echo "unknown part $part (check full full512k lora1m lora64k lora128k lora512k llama1b hf)"; exit 2 ;;
    esac
done
free -g | head -2
