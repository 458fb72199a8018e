#!/usr/bin/env bash
# Mutation testing of the modules where a silent change costs the most (leases,
# fencing, acks and fails, recovery, routing after a failover, the Lua wrappers'
# argument building): each mutant of [tool.mutmut] only_mutate in pyproject.toml is run
# against the tests that reach it, on a standalone server the tests start. Not in CI:
# it takes a while (about 17 minutes on 2 cores). Survivors and why they are
# accepted: docs/mutants.md. Extra arguments go to `mutmut run`.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
.venv/bin/python -m pip install --quiet --disable-pip-version-check 'mutmut==3.8.1'
rm -rf mutants
.venv/bin/mutmut run --max-children "$(nproc)" "$@" || true
.venv/bin/mutmut results --all true | awk '{print $NF}' | sort | uniq -c
echo "survivors:"
.venv/bin/mutmut results
