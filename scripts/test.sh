#!/usr/bin/env bash
# Set everything up and run the checks: ruff, mypy and the test suite against real
# servers (a standalone node and a 6-node cluster that the tests start themselves).
# Extra arguments go to pytest, e.g. scripts/test.sh -k topology
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"
echo "== ruff"; ruff check .
echo "== mypy"; mypy
echo "== pytest"; python -m pytest "$@"
