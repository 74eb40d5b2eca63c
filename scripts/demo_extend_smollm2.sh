#!/usr/bin/env bash
# Extend SmolLM2-135M-Instruct from 8K to 64K on one GPU and show it: evaluation before, training with
# the preset configs/experiment/smollm2_extend_64k_1gpu.yaml, evaluation after, one bench JSON.
#
#   SMOLLM2=<HF folder from scripts/make_smollm2.py> OUT=<copy of the results> bash scripts/demo_extend_smollm2.sh PIECE...
#
# Pieces, each its own command (run them in order, on one machine; each fits a few minutes of one H200):
#   split   held-out data: the ShareGPT sample's first 240 conversations train, the last 60 are held
#           out for the losses and the needle's haystack (train.json, heldout.json; seconds)
#   base    evaluation of $SMOLLM2 as it is (stage base)                                (~3-4 min)
#   train   the preset on train.json into $RUN_DIR, its HF export in $RUN_DIR/hf         (~6-7 min)
#           under `timeout $TRAIN_TIMEOUT`: a run cut off saves a checkpoint (SIGTERM) and
#           running `train` again resumes it; the export is written when the steps are done
#   after   evaluation of $RUN_DIR's export (stage trained)                             (~3-4 min)
#   report  the before/after table (table.md) and figures from the bench JSON           (seconds, no GPU)
#   all     every piece in order
#
# Results accumulate in $RESULTS (default /tmp/longctx_smollm2_demo, kept between pieces):
# long_context_smollm2_h200.json (the bench rows of both stages and the commands), base/ and
# trained/ (results.json, rows.json, figures), table.md, the comparison figures,
# train_metrics.jsonl, train_config.yaml and the logs. After each piece they are copied to $OUT
# when it is set (a folder that is fresh for each command, as on a lent GPU machine). $RUN_DIR
# (default /tmp/longctx_smollm2_run) holds the checkpoints and the 0.5 GB export.
# Settings: LENGTHS, DEPTHS, SAMPLES (a cell), LOSS_LENGTH (loss by position), TRAIN_TIMEOUT (seconds),
# EXTRA_TRAIN (more training overrides), EXTRA_EVAL (more evaluation settings).
set -euo pipefail
: "${SMOLLM2:?set SMOLLM2 to the SmolLM2-135M-Instruct HF folder (python scripts/make_smollm2.py <folder>)}"
RESULTS=${RESULTS:-/tmp/longctx_smollm2_demo}
RUN_DIR=${RUN_DIR:-/tmp/longctx_smollm2_run}
LENGTHS=${LENGTHS:-[4096,8192,16384,32768,65536]}
DEPTHS=${DEPTHS:-[0.0,0.5,1.0]}
SAMPLES=${SAMPLES:-20}
LOSS_LENGTH=${LOSS_LENGTH:-65536}
TRAIN_TIMEOUT=${TRAIN_TIMEOUT:-540}
EXTRA_TRAIN=${EXTRA_TRAIN:-}
EXTRA_EVAL=${EXTRA_EVAL:-}
PYTHON=${PYTHON:-python3}   # the GPU image has python3 only
BENCH="$RESULTS/long_context_smollm2_h200.json"
cd "$(dirname "$0")/.."
mkdir -p "$RESULTS"

split() {
  "$PYTHON" - "$RESULTS" <<'EOF'
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
  [ -f "$RESULTS/heldout.json" ] || split
  # shellcheck disable=SC2086  # EXTRA_EVAL is a list of settings
  "$PYTHON" -m longctx.eval model.path="$1" model.name=smollm2-135m-instruct stage="$2" \
    lengths="$LENGTHS" depths="$DEPTHS" samples_per_cell="$SAMPLES" max_new_tokens=10 \
    tasks=[needle,passkey,line_retrieval,loss,short_loss] \
    needle.haystack="$RESULTS/heldout.json" loss.data="$RESULTS/heldout.json" loss.length="$LOSS_LENGTH" loss.sequences=2 \
    short_loss.data="$RESULTS/heldout.json" short_loss.length=2048 short_loss.sequences=16 \
    output_dir="$RESULTS/$2" append_to="$BENCH" $EXTRA_EVAL 2>&1 | tee "$RESULTS/eval_$2_log.txt"
}

train() {
  [ -f "$RESULTS/train.json" ] || split
  local rc=0
  # shellcheck disable=SC2086  # EXTRA_TRAIN is a list of overrides
  timeout --signal=TERM "$TRAIN_TIMEOUT" "$PYTHON" -m longctx.train experiment=smollm2_extend_64k_1gpu \
    model.pretrained="$SMOLLM2" data.tokenizer="$SMOLLM2" data.path="$RESULTS/train.json" run_dir="$RUN_DIR" $EXTRA_TRAIN \
    2>&1 | tee -a "$RESULTS/train_log.txt" || rc=$?
  cp "$RUN_DIR/metrics.jsonl" "$RESULTS/train_metrics.jsonl" 2>/dev/null || true
  cp "$RUN_DIR/config.yaml" "$RESULTS/train_config.yaml" 2>/dev/null || true
  if [ ! -f "$RUN_DIR/hf/config.json" ]; then
    echo "training stopped before its last step (exit $rc): run this piece again to resume from $RUN_DIR" >&2
    copy_out
    return 1
  fi
}

copy_out() {
  if [ -n "${OUT:-}" ] && [ "$(realpath -m "$OUT")" != "$(realpath -m "$RESULTS")" ]; then
    mkdir -p "$OUT" && cp -r "$RESULTS"/. "$OUT"/
  fi
}

for piece in "${@:-all}"; do
  case "$piece" in
    split) split ;;
    base) evaluate "$SMOLLM2" base ;;
    train) train ;;
    after) evaluate "$RUN_DIR" trained ;;
    report) "$PYTHON" -m longctx.eval.report "$BENCH" "$RESULTS" ;;
    all) split; evaluate "$SMOLLM2" base; train; evaluate "$RUN_DIR" trained; "$PYTHON" -m longctx.eval.report "$BENCH" "$RESULTS" ;;
    *) echo "unknown piece $piece: split | base | train | after | report | all" >&2; exit 2 ;;
  esac
  copy_out
done
