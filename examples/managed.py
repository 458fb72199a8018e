"""Connecting to a managed or secured cluster (ElastiCache, Memorystore, your own with TLS
and ACL users): build the URL, then check what the user may do before deploying.

    CLUSTERQ_HOST=clustercfg.my-cache.use1.cache.amazonaws.com CLUSTERQ_PORT=6379 \\
    CLUSTERQ_USER=app CLUSTERQ_PASSWORD=... CLUSTERQ_CA=/etc/ssl/certs/ca-certificates.crt \\
    python examples/managed.py

Without ``CLUSTERQ_CA`` the connection is plaintext. A client certificate (servers that ask
for one): ``CLUSTERQ_CERT`` and ``CLUSTERQ_KEY``. Exits 1 if a role lacks a permission.
"""

import os
import sys
from urllib.parse import quote

from clusterq import Client
from clusterq.ops.doctor import check


def url_from_env(env: dict[str, str]) -> str:
    """``rediss://user:password@host:port?ssl_ca_certs=...`` from the settings above."""
    auth = ""
    if env.get("CLUSTERQ_USER") or env.get("CLUSTERQ_PASSWORD"):
        user = quote(env.get("CLUSTERQ_USER", "default"), safe="")
        auth = f"{user}:{quote(env.get('CLUSTERQ_PASSWORD', ''), safe='')}@"
    where = f"{env.get('CLUSTERQ_HOST', '127.0.0.1')}:{env.get('CLUSTERQ_PORT', '6379')}"
    if not env.get("CLUSTERQ_CA"):
        return f"redis://{auth}{where}"
    options = [f"ssl_ca_certs={quote(env['CLUSTERQ_CA'])}"]
    if env.get("CLUSTERQ_CERT"):
        options += [
            f"ssl_certfile={quote(env['CLUSTERQ_CERT'])}",
            f"ssl_keyfile={quote(env.get('CLUSTERQ_KEY', ''))}",
        ]
    return f"rediss://{auth}{where}?{'&'.join(options)}"


def main() -> int:
    url = url_from_env(dict(os.environ))
    prefix = os.environ.get("CLUSTERQ_PREFIX", "clusterq")
    report = check(url, prefix=prefix)  # every command each role needs, probed
    for role in report.roles:
        missing = report.missing(role)
        print(f"{role}: {'ok' if report.ok(role) else 'missing ' + ', '.join(missing)}")
    with Client(url, prefix=prefix) as client:  # nothing written: doctor probed already
        masters = ", ".join(m.addr for m in client.backend.topology.masters)
        print(f"{client.backend.mode} with masters {masters}")
    return 0 if all(report.ok(role) for role in report.roles) else 1


if __name__ == "__main__":
    sys.exit(main())
