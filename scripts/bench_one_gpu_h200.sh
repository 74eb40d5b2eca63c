#!/bin/bash
# The one-GPU measurements of issue 21 in one device call (bench/results/train_8b_h200.json): the
# bf16 checks first (nothing is timed if they fail), then each part under its own time limit,
# the whole under the call's 600 s. Rows as in scripts/bench_one_gpu.py.
set -o pipefail
OUT=${OUT:-/tmp/out}
start=$(date +%s)
left() { echo $(( $1 - ($(date +%s) - start) )); }
run() {   # name, time limit, rows...
    local name=$1 limit=$2; shift 2
    timeout "$limit" python3 scripts/bench_one_gpu.py --out "$OUT/$name.json" --rows "$@" 2>&1 | tee -a "$OUT/log.txt"
}
free -g | head -2
timeout 90 python3 scripts/bench_one_gpu.py --check 2>&1 | tee -a "$OUT/log.txt" || { echo "checks failed: nothing timed"; exit 1; }
run full 290 "llama3-8b full 65536" "llama3-8b full 131072" "llama3-8b full 524288 group=4 docs=8192"
run lora 100 "llama3-8b lora 1048576 layers=4 group=2 offload=1 docs=8192" "llama3-8b lora 65536"
run llama1b 70 "llama3.2-1b gpu_adamw 1048576 docs=8192"
run hf "$(left 575)" "llama3-8b hf_liger 16384" "llama3-8b hf_liger 131072"
free -g | head -2
