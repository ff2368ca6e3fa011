#!/usr/bin/env bash
# The weather agent. Without a GPU or weights it runs the tiny random-weight Qwen2 model: its text
# is noise, the tool call is forced by structured outputs. `bash scripts/demo.sh up` opens the REPL.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-1}
.venv/bin/qwenrun tiny-model .cache/tiny-qwen2
if [ "${1:-run}" = up ]; then
    exec .venv/bin/qwenrun up agents/weather-tiny.yaml
fi
exec .venv/bin/qwenrun run agents/weather-tiny.yaml -p "${1:-广州天气情况如何?}"
