#!/usr/bin/env bash
# The exit loop of issue 29: N runs of `torchrun --nproc_per_node 2 -m longctx.check parallel=ring`,
# counting the runs that do not exit 0 and those that abort (SIGABRT, "terminate called ...").
#   scripts/exit_loop.sh [N=50] [extra overrides ...]     (e.g. model.hidden_size=64 for a quicker loop)
N=${1:-50}; shift
fails=0; aborts=0
for i in $(seq 1 "$N"); do
  out=$(python -m torch.distributed.run --standalone --nproc_per_node 2 -m longctx.check parallel=ring "$@" 2>&1)
  rc=$?
  if [ $rc -ne 0 ]; then fails=$((fails + 1)); fi
  echo "run $i: exit $rc"
  if grep -q "terminate called\|SIGABRT\|Signals.SIGABRT" <<<"$out"; then aborts=$((aborts + 1)); echo "$out" | tail -5; fi
  grep -q "^PASS" <<<"$out" || echo "run $i: no PASS (rc $rc)"
  if [ $rc -ne 0 ]; then echo "--- run $i, exit $rc:"; tail -25 <<<"$out"; fi
done
echo "runs $N, non-zero exits $fails, aborts $aborts"
