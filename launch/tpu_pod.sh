#!/usr/bin/env bash
# Training on a Cloud TPU pod slice: the same command on every worker (one process per host).
#
#   bash launch/tpu_pod.sh TPU_NAME ZONE --config=configs/sst2_minilm.py --workdir=gs://BUCKET/runs/sst2
#
# Every worker needs the repository at ~/jaxft (e.g. git clone on each, or a shared disk) set up
# with: JAXFT_EXTRAS=test,tpu bash launch/setup.sh. jax.distributed.initialize() finds the other
# workers through the TPU metadata; the workdir must be shared (a gs:// bucket or NFS).
set -euo pipefail
if [ $# -lt 2 ]; then
  echo "usage: bash launch/tpu_pod.sh TPU_NAME ZONE [train flags...]" >&2
  exit 2
fi
TPU_NAME=$1; ZONE=$2; shift 2
printf -v FLAGS '%q ' "$@"
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --worker=all \
  --command="cd ~/jaxft && .venv/bin/python -m jaxft.train ${FLAGS} --config.parallel.distributed=on"
