#!/usr/bin/env bash
# Optional: clusterq and the Python peers (Huey, Dramatiq, taskiq-redis, SAQ, RQ, arq) side
# by side on a server this starts itself. The peers go into virtual environments under
# .venv-peers, never into clusterq's dependencies: .venv-peers/main (clusterq and the peers
# of benchmarks/peers/requirements.txt), and one per benchmarks/peers/requirements-NAME.txt
# (.venv-peers/NAME: SAQ and arq, whose redis-py pins exclude taskiq-redis's).
# Arguments go to benchmarks/peers/run.py, e.g. scripts/peers.sh --tasks 5000 --rounds 3
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh >/dev/null
CLUSTERQ_SERVER_BIN="$(.venv/bin/python -c 'from clusterq.tools.servers import find_server_binary as f; print(f())')"
export CLUSTERQ_SERVER_BIN
if [ -f .venv-peers/pyvenv.cfg ]; then
    rm -rf .venv-peers  # the single environment of earlier versions of this script
fi
venv() {
    if [ ! -x ".venv-peers/$1/bin/python" ]; then
        python3 -m venv ".venv-peers/$1"
    fi
}
venv main
.venv-peers/main/bin/pip install -q -e . -r benchmarks/peers/requirements.txt
for requirements in benchmarks/peers/requirements-*.txt; do
    name="$(basename "$requirements" .txt)"
    name="${name#requirements-}"
    venv "$name"
    ".venv-peers/$name/bin/pip" install -q -r "$requirements"
done
export PEERS_VENVS="$PWD/.venv-peers"
exec .venv-peers/main/bin/python benchmarks/peers/run.py "$@"
