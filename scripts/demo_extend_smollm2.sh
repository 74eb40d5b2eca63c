#!/usr/bin/env bash
# Extend SmolLM2-135M-Instruct from 8K to 64K on one GPU and show it: evaluation before, training with
# the preset configs/experiment/smollm2_extend_64k_1gpu.yaml, evaluation after, one bench JSON.
#
#   OUT=<results folder> SMOLLM2=<HF folder from scripts/make_smollm2.py> bash scripts/demo_extend_smollm2.sh PIECE...
#
# Pieces, each its own command (run them in order; each fits a few minutes of one H200):
#   split   held-out data: the ShareGPT sample's first 240 conversations train, the last 60 are held
#           out for the losses and the needle's haystack ($OUT/train.json, $OUT/heldout.json; seconds)
#   base    evaluation of $SMOLLM2 as it is (stage base)                                (~3 min)
#   train   the preset on $OUT/train.json into $RUN_DIR, its HF export in $RUN_DIR/hf    (~6-7 min)
#           under `timeout $TRAIN_TIMEOUT`: a run cut off saves a checkpoint (SIGTERM) and
#           running `train` again resumes it; the export is written when the steps are done
#   after   evaluation of $RUN_DIR's export (stage trained)                             (~3 min)
#   report  the before/after table ($OUT/table.md) and figures from the bench JSON      (seconds)
#   all     every piece in order
#
# Everything lands in $OUT: long_context_smollm2_h200.json (the bench rows of both stages and the
# commands), base/ and trained/ (results.json, rows.json, figures), table.md, the comparison
# figures, train_metrics.jsonl and train_log.txt. $RUN_DIR (default /tmp/longctx_smollm2_run) holds
# the checkpoints and the 0.5 GB export, outside $OUT.
# Settings: LENGTHS, DEPTHS, SAMPLES (a cell), LOSS_LENGTH (loss by position), TRAIN_TIMEOUT (seconds),
# EXTRA_TRAIN (more training overrides), EXTRA_EVAL (more evaluation settings).
set -euo pipefail
: "${OUT:?set OUT to the results folder}"
: "${SMOLLM2:?set SMOLLM2 to the SmolLM2-135M-Instruct HF folder (python scripts/make_smollm2.py <folder>)}"
RUN_DIR=${RUN_DIR:-/tmp/longctx_smollm2_run}
LENGTHS=${LENGTHS:-[4096,8192,16384,32768,65536]}
DEPTHS=${DEPTHS:-[0.0,0.5,1.0]}
SAMPLES=${SAMPLES:-20}
LOSS_LENGTH=${LOSS_LENGTH:-65536}
TRAIN_TIMEOUT=${TRAIN_TIMEOUT:-540}
EXTRA_TRAIN=${EXTRA_TRAIN:-}
EXTRA_EVAL=${EXTRA_EVAL:-}
BENCH="$OUT/long_context_smollm2_h200.json"
cd "$(dirname "$0")/.."
mkdir -p "$OUT"

split() {
  python - "$OUT" <<'EOF'
import json, sys
from pathlib import Path
from longctx.data.sharegpt import resolve_path
out = Path(sys.argv[1])
records = json.loads(resolve_path("data/sharegpt_sample.json").read_text())
held = 60   # 20 %: ~80K tokens, one 64K sequence for the loss by position and the 2K short-context loss
(out / "train.json").write_text(json.dumps(records[:-held]))
(out / "heldout.json").write_text(json.dumps(records[-held:]))
print(f"{len(records) - held} conversations to train on, {held} held out, in {out}")
EOF
}

evaluate() {   # $1: model path, $2: stage
  [ -f "$OUT/heldout.json" ] || split
  # shellcheck disable=SC2086  # EXTRA_EVAL is a list of settings
  python -m longctx.eval model.path="$1" model.name=smollm2-135m-instruct stage="$2" \
    lengths="$LENGTHS" depths="$DEPTHS" samples_per_cell="$SAMPLES" max_new_tokens=10 \
    tasks=[needle,passkey,line_retrieval,loss,short_loss] \
    needle.haystack="$OUT/heldout.json" loss.data="$OUT/heldout.json" loss.length="$LOSS_LENGTH" loss.sequences=2 \
    short_loss.data="$OUT/heldout.json" short_loss.length=2048 short_loss.sequences=16 \
    output_dir="$OUT/$2" append_to="$BENCH" $EXTRA_EVAL 2>&1 | tee "$OUT/eval_$2_log.txt"
}

train() {
  [ -f "$OUT/train.json" ] || split
  local rc=0
  # shellcheck disable=SC2086  # EXTRA_TRAIN is a list of overrides
  timeout --signal=TERM "$TRAIN_TIMEOUT" python -m longctx.train experiment=smollm2_extend_64k_1gpu \
    model.pretrained="$SMOLLM2" data.tokenizer="$SMOLLM2" data.path="$OUT/train.json" run_dir="$RUN_DIR" $EXTRA_TRAIN \
    2>&1 | tee -a "$OUT/train_log.txt" || rc=$?
  cp "$RUN_DIR/metrics.jsonl" "$OUT/train_metrics.jsonl" 2>/dev/null || true
  cp "$RUN_DIR/config.yaml" "$OUT/train_config.yaml" 2>/dev/null || true
  if [ ! -f "$RUN_DIR/hf/config.json" ]; then
    echo "training stopped before its last step (exit $rc): run this piece again to resume from $RUN_DIR" >&2
    return 1
  fi
}

for piece in "${@:-all}"; do
  case "$piece" in
    split) split ;;
    base) evaluate "$SMOLLM2" base ;;
    train) train ;;
    after) evaluate "$RUN_DIR" trained ;;
    report) python -m longctx.eval.report "$BENCH" "$OUT" ;;
    all) split; evaluate "$SMOLLM2" base; train; evaluate "$RUN_DIR" trained; python -m longctx.eval.report "$BENCH" "$OUT" ;;
    *) echo "unknown piece $piece: split | base | train | after | report | all" >&2; exit 2 ;;
  esac
done
