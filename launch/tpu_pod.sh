#!/usr/bin/env bash
# Training on a Cloud TPU pod slice: the same command on every worker (one process per host).
#
#   bash launch/tpu_pod.sh TPU_NAME ZONE --config=configs/sst2_minilm.py --workdir=gs://BUCKET/runs/sst2
#
# Every worker needs the repository at ~/jaxft (git clone on each, or a shared disk), set up with
# JAXFT_EXTRAS=tpu bash launch/setup.sh. jax.distributed finds the other workers through the TPU
# metadata; the workdir must be shared: a gs:// bucket (or NFS).
#
# Each worker runs detached (setsid, nohup) with its log in ~/jaxft/logs/tpu_pod-worker<i>.log,
# so a dropped ssh connection stops nothing. This script then waits for all of them: when one
# fails it stops the others and exits with its status (75: preempted, every worker saved the
# same step; run the same command again to resume). A new launch first ends the jaxft processes
# a previous launch left on the workers, found by the process ids it recorded
# (~/jaxft/.tpu_pod.pid), never by name.
#
# JAXFT_POLL_SECONDS (default 30): how often the workers are checked.
set -euo pipefail
if [ $# -lt 2 ]; then
  echo "usage: bash launch/tpu_pod.sh TPU_NAME ZONE [train flags...]" >&2
  exit 2
fi
TPU_NAME=$1; ZONE=$2; shift 2
POLL="${JAXFT_POLL_SECONDS:-30}"
MODULE="${JAXFT_MODULE:-jaxft.train}"
printf -v FLAGS '%q ' "$@"
STATE='~/jaxft/.tpu_pod'  # .pid: the worker's process group; .status: its exit status

on_worker() {  # on_worker WORKER COMMAND: runs COMMAND on one worker ("all": every worker)
  gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --worker="$1" --command="$2"
}

WORKERS=$(gcloud compute tpus tpu-vm describe "$TPU_NAME" --zone="$ZONE" \
  --format='value(networkEndpoints[].ipAddress)' | tr ';,' '\n\n' | grep -c .)
echo "launch/tpu_pod.sh: $TPU_NAME has $WORKERS workers"

# A previous launch's processes: TERM to their process groups, then KILL what is left.
STOP="if [ -f $STATE.pid ]; then p=\$(cat $STATE.pid); kill -TERM -- -\$p 2>/dev/null; \
for i in 1 2 3 4 5 6 7 8 9 10; do kill -0 -- -\$p 2>/dev/null || break; sleep 1; done; \
kill -KILL -- -\$p 2>/dev/null; rm -f $STATE.pid; fi; true"
on_worker all "$STOP"

START="cd ~/jaxft && mkdir -p logs && rm -f $STATE.status && { \
nohup setsid bash -c '.venv/bin/python -m $MODULE $FLAGS; echo \$? > $STATE.status' \
> logs/tpu_pod-worker\${TPU_WORKER_ID:-\$(hostname)}.log 2>&1 < /dev/null & echo \$! > $STATE.pid; }"
for ((w = 0; w < WORKERS; w++)); do
  on_worker "$w" "export TPU_WORKER_ID=$w; $START"
done
echo "launch/tpu_pod.sh: started; logs in ~/jaxft/logs on each worker"

# running | done <status>, for one worker
STATUS="if [ -f $STATE.status ]; then echo done \$(cat $STATE.status); \
elif [ -f $STATE.pid ] && kill -0 -- -\$(cat $STATE.pid) 2>/dev/null; then echo running; \
else echo done 137; fi"
while true; do
  finished=0; preempted=0; failed=""
  for ((w = 0; w < WORKERS; w++)); do
    state=$(on_worker "$w" "$STATUS" | tail -n 1) || state="unreachable"
    case "$state" in
      running|unreachable) ;;  # an ssh that fails is retried at the next poll
      "done 0") finished=$((finished + 1)) ;;
      "done 75") preempted=$((preempted + 1)) ;;  # saved a step on SIGTERM: the others will too
      done*) failed="${failed:-$w ${state#done }}" ;;
    esac
  done
  if [ -n "$failed" ]; then
    read -r worker status <<< "$failed"
    echo "launch/tpu_pod.sh: worker $worker exited with status $status; stopping the others" >&2
    on_worker all "$STOP"
    exit "$status"
  fi
  if [ $((finished + preempted)) -eq "$WORKERS" ]; then
    if [ "$preempted" -gt 0 ]; then
      echo "launch/tpu_pod.sh: preempted; the workers saved a checkpoint; run the same command" \
        "again to resume" >&2
      exit 75
    fi
    echo "launch/tpu_pod.sh: all $WORKERS workers finished"
    exit 0
  fi
  sleep "$POLL"
done
