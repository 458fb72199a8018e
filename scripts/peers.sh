#!/usr/bin/env bash
# Optional: clusterq and the Python peers (Huey, Dramatiq, RQ) side by side on a server
# this starts itself. The peers go into .venv-peers, never into clusterq's dependencies.
# Arguments go to benchmarks/peers/run.py, e.g. scripts/peers.sh --tasks 5000 --rounds 3
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh >/dev/null
CLUSTERQ_SERVER_BIN="$(.venv/bin/python -c 'from clusterq.tools.servers import find_server_binary as f; print(f())')"
export CLUSTERQ_SERVER_BIN
if [ ! -x .venv-peers/bin/python ]; then
    python3 -m venv .venv-peers
fi
.venv-peers/bin/pip install -q -e . -r benchmarks/peers/requirements.txt
exec .venv-peers/bin/python benchmarks/peers/run.py "$@"
