#!/usr/bin/env bash
# Multi-process training on one machine, for testing multi-host code paths on CPU:
#
#   bash launch/local.sh NUM_PROCESSES DEVICES_PER_PROCESS [jaxft.train flags...]
#   bash launch/local.sh 2 4 --config=configs/demo.py --workdir=runs/demo_2x4
#
# Starts NUM_PROCESSES `python -m jaxft.train` processes with DEVICES_PER_PROCESS CPU devices each,
# gloo collectives and a coordinator on 127.0.0.1. Exits non-zero (and stops the others) as soon
# as any process fails; exits 75 when the run was preempted (SIGTERM: every process saves the
# same step, run the command again to resume). Logs of process i go to stderr prefixed with [i].
set -uo pipefail
if [ $# -lt 2 ]; then
  echo "usage: bash launch/local.sh NUM_PROCESSES DEVICES_PER_PROCESS [train flags...]" >&2
  exit 2
fi
NUM=$1; DEVICES=$2; shift 2
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}"
PORT="${JAXFT_PORT:-$((20000 + RANDOM % 20000))}"
pids=()
for ((i = 0; i < NUM; i++)); do
  JAX_PLATFORMS=cpu \
  XLA_FLAGS="--xla_force_host_platform_device_count=${DEVICES} ${XLA_FLAGS:-}" \
  JAXFT_COORDINATOR_ADDRESS="127.0.0.1:${PORT}" JAXFT_NUM_PROCESSES="$NUM" JAXFT_PROCESS_ID="$i" \
  JAXFT_LOCAL_PROCESSES="$NUM" \
    "$PYTHON" -m "${JAXFT_MODULE:-jaxft.train}" "$@" 2> >(sed "s/^/[$i] /" >&2) &
  pids+=($!)
done
status=0
for ((n = 0; n < NUM; n++)); do
  wait -n "${pids[@]}"
  rc=$?
  if [ $rc -eq 75 ]; then  # preempted: every process saves the same step and exits 75 too
    status=75
  elif [ $rc -ne 0 ]; then
    echo "launch/local.sh: a process exited with status $rc; stopping the others" >&2
    kill "${pids[@]}" 2>/dev/null
    status=$rc
    break
  fi
done
wait 2>/dev/null
exit $status
