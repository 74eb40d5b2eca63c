#!/usr/bin/env bash
# The exit loop of issue 29: N runs of `torchrun --nproc_per_node 2 -m longctx.check parallel=ring`,
# counting the runs that do not exit 0 and those that abort (SIGABRT, "terminate called ...").
#   scripts/exit_loop.sh [N=50] [extra overrides ...]
N=${1:-50}; shift
fails=0; aborts=0
for i in $(seq 1 "$N"); do
  out=$(OMP_NUM_THREADS=1 python -m torch.distributed.run --standalone --nproc_per_node 2 -m longctx.check \
        parallel=ring train.seq_len=256 model.hidden_size=64 model.intermediate_size=128 model.num_hidden_layers=2 \
        model.num_attention_heads=4 model.num_key_value_heads=2 data.verbose=false train.threads=1 "$@" 2>&1)
  rc=$?
  if [ $rc -ne 0 ]; then fails=$((fails + 1)); fi
  if grep -q "terminate called\|SIGABRT\|Signals.SIGABRT" <<<"$out"; then aborts=$((aborts + 1)); echo "$out" | tail -5; fi
  grep -q "^PASS" <<<"$out" || echo "run $i: no PASS (rc $rc): $(tail -3 <<<"$out")"
done
echo "runs $N, non-zero exits $fails, aborts $aborts"
