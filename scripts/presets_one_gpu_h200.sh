#!/bin/bash
# The two one-GPU presets on packed ShareGPT (the sample), cut to 2 layers of the 8B shape at 16K
# tokens so that they fit a short device call: full finetuning (offloaded optimizer) for 4 steps
# without a checkpoint (one holds 18 GB of optimizer state at this size); LoRA 2 steps with a
# checkpoint each step, then resumed for step 3.
OUT=${OUT:-/tmp/out}
COMMON="data=sharegpt_sample model.num_hidden_layers=2 train.checkpoint_group=2 train.seq_len=16384 \
logging.progress_bar=false checkpoint.export_hf=false optim.warmup_steps=1"
timeout 35 python3 -m longctx.train experiment=llama3-8b_sharegpt_512k_1gpu $COMMON run_dir=/tmp/full \
    train.steps=4 checkpoint.at_end=false optim.lr=1e-4 2>&1 | grep -v Warning | tail -12 | tee -a "$OUT/presets.txt"
cp /tmp/full/metrics.jsonl "$OUT/preset_full_metrics.jsonl"
for steps in 2 3; do
    timeout 20 python3 -m longctx.train experiment=llama3-8b_lora_sharegpt_1m_1gpu $COMMON run_dir=/tmp/lora \
        train.steps=$steps checkpoint.every=1 2>&1 | grep -v Warning | tail -6 | tee -a "$OUT/presets.txt"
done
cp /tmp/lora/metrics.jsonl "$OUT/preset_lora_metrics.jsonl"
