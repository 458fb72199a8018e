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

# The whole suite on Redis (where it is at hand), then the failover, topology and drill
# tests (marker both_servers) again on Valkey: servers differ in what they report during
# a failover. Extra arguments go to the first pass only; with arguments the second pass
# runs only if CLUSTERQ_BOTH_SERVERS=1. CI sets CLUSTERQ_REQUIRE_BOTH_SERVERS=1: a
# missing server is then an error, not a warning.
server_of() {
    python -c "import sys; from clusterq.tools.servers import find_server_binaries as f; p = f().get(sys.argv[1]); print(p or '')" "$1"
}
REDIS_BIN=$(server_of redis)
VALKEY_BIN=$(server_of valkey)
missing() {
    if [ "${CLUSTERQ_REQUIRE_BOTH_SERVERS:-0}" = 1 ]; then
        echo "test: no $1 server found; both Redis and Valkey are required here" >&2
        exit 3
    fi
    echo "test: WARNING: no $1 server found; its pass is skipped" >&2
}
if [ -n "$REDIS_BIN" ]; then
    echo "== pytest on Redis ($REDIS_BIN)"
    CLUSTERQ_SERVER_BIN="$REDIS_BIN" python -m pytest "$@"
else
    missing redis
    echo "== pytest"; python -m pytest "$@"
fi
if [ $# -eq 0 ] || [ "${CLUSTERQ_BOTH_SERVERS:-0}" = 1 ]; then
    if [ -n "$VALKEY_BIN" ] && [ -n "$REDIS_BIN" ]; then
        echo "== pytest -m both_servers on Valkey ($VALKEY_BIN)"
        CLUSTERQ_SERVER_BIN="$VALKEY_BIN" python -m pytest -m both_servers -p no:cacheprovider
    elif [ -z "$VALKEY_BIN" ]; then
        missing valkey
    fi
fi
