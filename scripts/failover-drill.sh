#!/usr/bin/env bash
# Run every failover drill mode against the local cluster, one after another:
# kill -9, SIGSTOP, CLUSTER FAILOVER, CLUSTER FAILOVER TAKEOVER. Each exits non-zero if
# an acknowledged task was lost. Extra arguments go to each `clusterq drill failover`.
#   QUEUE=images TASKS=2000 scripts/failover-drill.sh --rate 500
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
[ -x .venv/bin/clusterq ] || scripts/setup.sh
export PATH="$root/.venv/bin:$PATH"
export CLUSTERQ_URL="${CLUSTERQ_URL:-redis://127.0.0.1:7000}"
clusterq dev up >/dev/null
for mode in kill stop manual takeover; do
    echo "== drill: $mode"
    clusterq drill failover --queue "${QUEUE:-images}" --mode "$mode" --tasks "${TASKS:-2000}" "$@"
done
