#!/usr/bin/env bash
# Set everything up, start a local 6-node cluster on 127.0.0.1:7000-7005, enqueue tasks
# into three queues and show where each queue lives (`clusterq queue ls --cluster`).
# Stop the cluster afterwards with: scripts/cluster-down.sh
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"
export CLUSTERQ_URL=redis://127.0.0.1:7000

clusterq dev up
for queue in images webhooks notifications; do
    clusterq enqueue "$queue:demo" '{"hello": "cluster"}' --queue "$queue"
done
clusterq queue ls --cluster
