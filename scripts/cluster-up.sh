#!/usr/bin/env bash
# Start the local 6-node cluster (see `clusterq dev up --help` for options).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
[ -x "$root/.venv/bin/clusterq" ] || "$root/scripts/setup.sh"
exec "$root/.venv/bin/clusterq" dev up "$@"
