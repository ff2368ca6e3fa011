#!/usr/bin/env bash
# Install everything (Debian's Chromium for the browser tests too, when missing and possible),
# check the package with ruff and mypy, run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
source scripts/browser.sh
export HF_HUB_OFFLINE=1
.venv/bin/ruff check qwenrun tests plugins
.venv/bin/mypy
.venv/bin/python -m pytest "$@"
