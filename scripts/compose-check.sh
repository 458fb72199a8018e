#!/usr/bin/env bash
# Run docker-compose.cluster.yml for real: the Docker test of tests/test_compose.py (the
# host and a container reach all six nodes, a worker in a container processes tasks and
# follows a killed master). Needs a Docker engine with compose; as root with apt-get it
# installs Debian's docker.io and docker-compose and starts the engine for this run (and
# stops it after). Without Docker Hub (redis:7.2, python:3.11-slim cannot be pulled) it
# builds one stand-in image from Debian's packages (redis-server 7.0, Python 3.11 with
# clusterq's dependencies; no network needed in the container) and names it through
# CLUSTERQ_REDIS_IMAGE and CLUSTERQ_PYTHON_IMAGE. Where none of that can be had, it says
# why and exits 0. Run scripts/setup.sh first (scripts/test.sh does).
set -euo pipefail
cd "$(dirname "$0")/.."
skip() { echo "compose-check: not run: $*"; exit 0; }
log() { echo "compose-check: $*"; }
[ -x .venv/bin/python ] || { echo "compose-check: run scripts/setup.sh first" >&2; exit 2; }

as_root_with_apt() { [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; }
apt_install() {  # bounded: a machine that cannot install in 10 minutes skips
    local get=(timeout 600 env DEBIAN_FRONTEND=noninteractive apt-get -y -qq)
    "${get[@]}" install "$@" >/dev/null 2>&1 ||
        { "${get[@]}" update >/dev/null && "${get[@]}" install "$@" >/dev/null; }
}

STARTED_ENGINE=""
stop_engine() {
    if [ -n "$STARTED_ENGINE" ]; then
        kill "$STARTED_ENGINE" 2>/dev/null || true
        for _ in $(seq 1 50); do kill -0 "$STARTED_ENGINE" 2>/dev/null || break; sleep 0.2; done
    fi
}
trap stop_engine EXIT

if ! docker info >/dev/null 2>&1; then
    as_root_with_apt || skip "no Docker engine answers, and no apt-get as root to install one"
    if ! command -v dockerd >/dev/null; then
        log "installing Debian's docker.io"
        apt_install docker.io || skip "docker.io did not install"
    fi
    log "starting a Docker engine for this run"
    dockerd >/tmp/clusterq-compose-dockerd.log 2>&1 &
    STARTED_ENGINE=$!
    for _ in $(seq 1 60); do docker info >/dev/null 2>&1 && break; sleep 0.5; done
    docker info >/dev/null 2>&1 ||
        skip "the Docker engine did not start: $(tail -n 3 /tmp/clusterq-compose-dockerd.log)"
fi
if ! docker compose version >/dev/null 2>&1 && ! docker-compose version >/dev/null 2>&1; then
    as_root_with_apt || skip "neither the docker compose plugin nor docker-compose"
    log "installing Debian's docker-compose"
    apt_install docker-compose || skip "docker-compose did not install"
fi

STANDIN=clusterq-compose-standin:bookworm-2  # a new tag whenever build_standin changes
build_standin() {
    as_root_with_apt || skip "redis:7.2 cannot be pulled, and no apt-get as root to build a stand-in"
    command -v debootstrap >/dev/null || apt_install debootstrap || skip "no debootstrap"
    local root
    root=$(mktemp -d /tmp/clusterq-standin.XXXXXX)
    log "building $STANDIN from Debian's packages (a few minutes)"
    timeout 900 debootstrap --variant=minbase \
        --include=redis-server,redis-tools,python3,python3-pip,ca-certificates \
        bookworm "$root" http://deb.debian.org/debian >/tmp/clusterq-standin.log 2>&1 ||
        { rm -rf "$root"; skip "debootstrap failed: $(tail -n 3 /tmp/clusterq-standin.log)"; }
    # The host's own CAs (a proxy's), so pip inside reaches the index as the host does.
    cp /usr/local/share/ca-certificates/*.crt "$root/usr/local/share/ca-certificates/" 2>/dev/null || true
    cp /etc/resolv.conf "$root/etc/resolv.conf"
    chroot "$root" update-ca-certificates >/dev/null
    rm -f "$root"/usr/lib/python3.*/EXTERNALLY-MANAGED
    ln -sf python3 "$root/usr/bin/python"
    ln -sf pip3 "$root/usr/bin/pip"
    # clusterq's dependencies and build backend, so `pip install /src` needs no index
    # (PIP_NO_BUILD_ISOLATION=0 turns build isolation off: pip reads that variable inverted).
    local deps
    deps=$(.venv/bin/python -c 'import tomllib; p = tomllib.load(open("pyproject.toml", "rb")); print(" ".join(p["project"]["dependencies"] + p["build-system"]["requires"]))')
    # shellcheck disable=SC2086
    chroot "$root" env PIP_CERT=/etc/ssl/certs/ca-certificates.crt \
        pip install --quiet --root-user-action=ignore $deps ||
        { rm -rf "$root"; skip "the stand-in's Python packages did not install"; }
    tar -C "$root" -c . | docker import \
        -c 'ENV PIP_NO_INDEX=1 PIP_NO_BUILD_ISOLATION=0 PATH=/usr/local/bin:/usr/bin:/bin' \
        -c 'CMD ["sh"]' - "$STANDIN" >/dev/null
    rm -rf "$root"
}
if [ -z "${CLUSTERQ_REDIS_IMAGE:-}" ] && ! timeout 600 docker pull -q redis:7.2 >/dev/null 2>&1; then
    docker image inspect "$STANDIN" >/dev/null 2>&1 || build_standin
    export CLUSTERQ_REDIS_IMAGE=$STANDIN CLUSTERQ_PYTHON_IMAGE=$STANDIN
    log "Docker Hub unreachable: running with $STANDIN (redis-server 7.0, Python 3.11)"
fi
.venv/bin/python -m pytest -p no:cacheprovider -rs tests/test_compose.py
