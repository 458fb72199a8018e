#!/usr/bin/env bash
# Stop the local cluster started by cluster-up.sh (add --purge to delete its data).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
exec "$root/.venv/bin/clusterq" dev down "$@"
