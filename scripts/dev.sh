#!/usr/bin/env bash
# Set up .venv (once) and run the demo or the tests. Works on a bare machine:
#   - an existing torch (system or venv) is reused, never replaced;
#   - where there is none, torch==2.13.0 is installed first (the CPU build on this machine;
#     a plain `torch` requirement would pull a multi-GB CUDA build).
# Usage: bash scripts/dev.sh demo [tp-run demo flags] | test [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

if [ ! -x .venv/bin/python ]; then
    if "$PY" -c "import torch" 2>/dev/null; then
        "$PY" -m venv --system-site-packages .venv   # bring-your-own torch (e.g. a CUDA build)
    else
        "$PY" -m venv .venv
    fi
fi
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
    .venv/bin/python -m pip install -q "torch==2.13.0"
fi
stamp=.venv/.tp-runtime-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    .venv/bin/python -m pip install -q -e ".[test,bench]"
    touch "$stamp"
fi

cmd=${1:-test}
shift || true
case "$cmd" in
    demo) exec .venv/bin/tp-run demo "$@" ;;
    # two test files at a time (pytest-xdist; a file's tests stay together, sharing its
    # fixtures): many tests wait on ranks starting, timeouts and heartbeats, not on the cores
    test) exec .venv/bin/python -m pytest -q -n "${TP_TEST_WORKERS:-2}" --dist loadfile "$@" ;;
    *) echo "usage: bash scripts/dev.sh demo|test [args]" >&2; exit 2 ;;
esac
