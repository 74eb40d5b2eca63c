#!/bin/bash
# The two one-GPU presets at their own lengths (full finetuning at 512K tokens, LoRA at 1M) on packed
# ShareGPT, cut to LAYERS (default 4: one checkpoint group of the presets' 4) of the 8B shape's 32
# layers so that both fit one device call. Every other setting is the preset's, except a one-step
# warmup (optim.warmup_steps=1), so that a few steps show the loss moving. The shipped 300-record
# sample holds 366K tokens, less than one sequence at these lengths: the data file is that sample
# repeated 6 times (2.2M tokens), so that packing fills the sequences.
# Each preset: 2 steps with a checkpoint at step 2 (the full preset's holds the fp32 masters and AdamW
# moments of 1.9B parameters at 4 layers, 27 GB: at 32 layers its 112 GB would not fit this machine's
# 64 GiB disk), then the same command resumed for step 3.
#   OUT=/tmp/out bash scripts/presets_one_gpu_h200.sh
set -o pipefail
OUT=${OUT:-/tmp/out}
LAYERS=${LAYERS:-4}
LIMIT=${LIMIT:-150}
mkdir -p "$OUT"
python3 -c "import json; r = json.load(open('data/sharegpt_sample.json')); json.dump(r * 6, open('/tmp/sharegpt_x6.json', 'w'))"
COMMON="data=sharegpt_sample data.path=/tmp/sharegpt_x6.json model.num_hidden_layers=$LAYERS \
logging.progress_bar=false checkpoint.export_hf=false checkpoint.every=2 checkpoint.at_end=false optim.warmup_steps=1"
for preset in llama3-8b_sharegpt_512k_1gpu llama3-8b_lora_sharegpt_1m_1gpu; do
    for steps in 2 3; do
        echo "== $preset $LAYERS layers, train.steps=$steps" | tee -a "$OUT/presets.txt"
        timeout "$LIMIT" python3 -m longctx.train experiment=$preset $COMMON run_dir=/tmp/$preset train.steps=$steps \
            2>&1 | grep -v Warning | tail -25 | tee -a "$OUT/presets.txt"
    done
    cp /tmp/$preset/metrics.jsonl "$OUT/preset_${preset}_${LAYERS}layers_metrics.jsonl"
    rm -rf /tmp/$preset/checkpoints
done
