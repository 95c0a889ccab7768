#!/usr/bin/env bash
# Installs moelora (editable) and what the tests and benchmarks need into the current Python.
# torch: an existing install is kept (a user's CUDA build stays); otherwise the pinned CPU wheel
# torch==2.13.0, because an unpinned torch pulls a multi-GB CUDA build.
set -euo pipefail
PYTHON=${PYTHON:-python3}
cd "$(dirname "$0")/.."
if ! "$PYTHON" -c "import torch" >/dev/null 2>&1; then
    "$PYTHON" -m pip install --quiet "torch==2.13.0"
fi
"$PYTHON" -m pip install --quiet "setuptools>=64" wheel
# No build isolation: setup.py builds csrc/ against the torch installed above.
"$PYTHON" -m pip install --quiet --no-build-isolation -e ".[test,bench]"
