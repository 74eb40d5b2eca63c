#!/bin/bash
# bench/results/train_families_h200.json: the Qwen3-8B and Qwen2.5-7B shapes at 128K on one H200 with the
# settings of the Llama-3-8B rows of train_8b_h200.json (scripts/bench_train_8b_h200.sh, parts full and
# hf): longctx full finetuning in bf16 with fp32 masters and AdamW on the host (optim.offload), full
# checkpointing, blockwise MLP in chunks of 8K; against transformers' Qwen3ForCausalLM /
# Qwen2ForCausalLM with Liger's kernels for that family (all-bf16, AdamW on the GPU), in the same run.
# The Llama-3-8B pair comes last, as this run's link to train_8b_h200.json (same card).
#   scripts/bench_train_families_h200.sh                       # every part: 12-15 minutes, two device calls:
#   scripts/bench_train_families_h200.sh qwen3 qwen3_hf qwen25 qwen25_hf    # about 7-9 minutes
#   scripts/bench_train_families_h200.sh check llama llama_hf               # about 5 minutes
# One step each, no warm-up (the first row of a process includes the kernels' compilation; the HF
# row at 16K is HF's warm-up).
set -o pipefail
OUT=${OUT:-/tmp/out}
FILE=$OUT/train_families_h200.json
PARTS=${*:-check qwen3 qwen3_hf qwen25 qwen25_hf llama llama_hf}
mkdir -p "$OUT"
bench() {   # time limit, bench_train.py arguments...
    local limit=$1; shift
    timeout "$limit" python3 scripts/bench_train.py --warmup 0 --steps 1 --out "$FILE" --append "$@" 2>&1 \
        | tee -a "$OUT/log.txt"
}
LONGCTX=(--impls longctx --precisions bf16_pure --offload-optimizer --set model.mlp_chunk_size=8192 --seqlens 131072)
HF=(--impls hf_liger --precisions bf16_pure --seqlens 16384 131072)
free -g | head -2
[ -z "${*}" ] && rm -f "$FILE"
for part in $PARTS; do
    case $part in
        check) timeout 90 python3 scripts/bench_train.py --check 2>&1 | tee -a "$OUT/log.txt" \
                   || { echo "checks failed: nothing timed"; exit 1; } ;;
        llama) bench 150 --model llama3-8b "${LONGCTX[@]}" ;;
        llama_hf) bench 120 --model llama3-8b "${HF[@]}" ;;
        qwen3) bench 170 --model qwen3-8b "${LONGCTX[@]}" ;;
        qwen3_hf) bench 140 --model qwen3-8b "${HF[@]}" ;;
        qwen25) bench 150 --model qwen2.5-7b "${LONGCTX[@]}" ;;
        qwen25_hf) bench 120 --model qwen2.5-7b "${HF[@]}" ;;
        *) echo "unknown part $part (check qwen3 qwen3_hf qwen25 qwen25_hf llama llama_hf)"; exit 2 ;;
    esac
done
free -g | head -2
