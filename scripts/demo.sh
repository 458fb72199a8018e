#!/usr/bin/env bash
# Set everything up, start a local 6-node cluster on 127.0.0.1:7000-7005, run two worker
# processes, enqueue 3,000 tasks over three queues (three masters), wait for them, and
# show where each queue lives (`clusterq queue ls --cluster`) and who worked on them.
# Stop the cluster afterwards with: scripts/cluster-down.sh
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"
export CLUSTERQ_URL=redis://127.0.0.1:7000

clusterq dev up

logs=$(mktemp -d)
pids=()
for n in 1 2; do
    clusterq worker examples.worker:router --queues images=3,webhooks=2,notifications=1 \
        --concurrency 20 --name "demo-worker-$n" >"$logs/worker-$n.log" 2>&1 &
    pids+=($!)
done
trap 'kill -TERM "${pids[@]}" 2>/dev/null; wait "${pids[@]}" 2>/dev/null || true' EXIT

python examples/demo.py
clusterq worker ls
clusterq queue ls --cluster
echo "worker logs: $logs"
