#!/usr/bin/env bash
# jaxft on one NVIDIA GPU against PyTorch, in one command; benchmarks/device_check.py says what
# it measures. About 4 minutes on an H100.
#
#   bash launch/device_check.sh [OUT_DIR] [device_check.py flags, e.g. --dry_run]
#
# Made for a lent machine without network whose Python has jax (with its CUDA plugin), flax,
# optax, orbax-checkpoint and torch, but a transformers without Flax classes (5.x): the wheels
# in .whl/ (transformers 4.57.x and what it pins that the machine lacks; benchmarks/README.md
# lists them) go into a folder only jaxft's processes see, and PyTorch's runs keep the
# machine's own transformers. jaxft runs from this source checkout. Optional inputs, used when
# present: .device/tokenizer/ (the default model's tokenizer files, when its package is not
# installed) and .device/sst2/{train,dev}.tsv (the SST-2 epochs).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-${OUT:-.}}"
shift || true
PY="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || command -v python3 )}"
TORCH_PATH="${PYTHONPATH:-}"
if ls .whl/*.whl > /dev/null 2>&1; then
  SITE="${TMPDIR:-/tmp}/jaxft-site"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$SITE" .whl/*.whl
  export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
EXTRA=()
if [ -d .device/tokenizer ]; then EXTRA+=(--tokenizer=.device/tokenizer); fi
if [ -f .device/sst2/train.tsv ]; then
  EXTRA+=(--sst2_train=.device/sst2/train.tsv --sst2_dev=.device/sst2/dev.tsv)
fi
exec "$PY" benchmarks/device_check.py --out="$OUT" --torch_env="$TORCH_PATH" \
  ${EXTRA[@]+"${EXTRA[@]}"} "$@"
