#!/usr/bin/env bash
# One host, several GPUs: a single process sees every GPU; the mesh spreads over all of them.
#
#   bash launch/multi_gpu.sh --config=configs/sst2_minilm.py --workdir=runs/sst2_8gpu \
#     --config.data.train_file=data/sst2/train.tsv
#
# Pure data parallelism by default (parallel.mesh.data=-1). Shard large models too with e.g.
#   --config.parallel.mesh.data=2 --config.parallel.mesh.fsdp=4
# or use classic pmap data parallelism with --config.parallel.mode=pmap.
# Install with: JAXFT_EXTRAS=test,cuda12 bash launch/setup.sh
set -euo pipefail
cd "$(dirname "$0")/.."
exec .venv/bin/python -m jaxft.train "$@"
