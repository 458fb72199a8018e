"""Who may do what in the web UI, and the headers every answer carries.

- **Roles**: an *operator* sees everything and may act (pause, run, delete...); a
  *viewer* sees everything and may not (no action rendered, every POST answered 403).
  With no credentials configured, everyone is an operator (or a viewer in read-only
  mode): the UI binds to loopback by default.
- **Credentials**: HTTP basic authentication against the configured users, each with
  a role; or ``Authorization: Bearer <token>`` (an operator), the token from the
  environment (``CLUSTERQ_WEB_TOKEN``). Compared in constant time. Anything else: 401.
- **Behind a proxy**: ``X-Forwarded-Prefix`` (plain path segments) is taken as the root
  path, like ``--root-path``.
- **Headers**: a Content Security Policy (scripts only from the UI itself, no frames,
  forms only to itself), ``X-Content-Type-Options: nosniff``, ``Referrer-Policy``.
- **Audit**: each operator action is recorded (when, who, from where, what, on what,
  the outcome): logged to ``clusterq.web.audit`` and kept in memory for the Audit page.
"""

from __future__ import annotations

import base64
import collections
import hmac
import logging
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from typing import Any, Literal

Role = Literal["viewer", "operator"]

log = logging.getLogger("clusterq.web.audit")

CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data:; connect-src 'self'; frame-ancestors 'none'; form-action 'self'; "
    "base-uri 'none'; object-src 'none'"
)
#: An ``X-Forwarded-Prefix`` the UI uses as its root path (a proxy serving it under a
#: path says which): plain path segments only.
FORWARDED_PREFIX = re.compile(r"(/[A-Za-z0-9._~-]+)+")
HEADERS = [
    (b"content-security-policy", CSP.encode()),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"same-origin"),
    (b"x-frame-options", b"DENY"),
]


@dataclass(frozen=True)
class User:
    name: str
    password: str
    role: Role


def parse_user(text: str, role: Role) -> User:
    """``USER:PASSWORD`` as a user with ``role``; ValueError naming what is wrong."""
    name, sep, password = text.partition(":")
    if not sep or not name or not password:
        raise ValueError(f"give the {role} as USER:PASSWORD")
    return User(name, password, role)


class Guard:
    """ASGI middleware: authenticates (where credentials are configured), puts the
    caller's name and role in the scope (``clusterq.user``, ``clusterq.role``), and adds
    the security headers to every answer."""

    def __init__(
        self,
        app: Any,
        *,
        users: list[User],
        token: str | None,
        read_only: bool,
    ) -> None:
        self.app = app
        self.users = {
            b"Basic " + base64.b64encode(f"{u.name}:{u.password}".encode()): u for u in users
        }
        self.token = b"Bearer " + token.encode() if token else None
        self.default: Role = "viewer" if read_only else "operator"

    def _caller(self, given: bytes) -> tuple[str, Role] | None:
        if not self.users and self.token is None:
            return "-", self.default
        found = None
        for expected, user in self.users.items():  # every one compared: constant time
            if hmac.compare_digest(given, expected):
                found = (user.name, user.role)
        if self.token is not None and hmac.compare_digest(given, self.token):
            found = ("token", "operator")
        if found is not None and self.default == "viewer":
            return found[0], "viewer"
        return found

    async def __call__(
        self, scope: dict[str, Any], receive: Callable[[], Awaitable[Any]], send: Any
    ) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def with_headers(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), *HEADERS]
            await send(message)

        headers = dict(scope.get("headers") or [])
        forwarded = headers.get(b"x-forwarded-prefix")
        if forwarded is not None:
            text = forwarded.decode("latin-1").rstrip("/")
            if FORWARDED_PREFIX.fullmatch(text):  # anything else is ignored
                scope["root_path"] = text
        caller = self._caller(headers.get(b"authorization", b""))
        if caller is None:
            await with_headers(
                {
                    "type": "http.response.start",
                    "status": 401,
                    "headers": [
                        (b"www-authenticate", b'Basic realm="clusterq"'),
                        (b"content-type", b"text/plain; charset=utf-8"),
                    ],
                }
            )
            await with_headers({"type": "http.response.body", "body": b"authentication required"})
            return
        scope["clusterq.user"], scope["clusterq.role"] = caller
        await self.app(scope, receive, with_headers)


def same_origin(origin: str | None, host: str | None) -> bool:
    """Whether a POST's ``Origin`` (when the browser sent one) is the UI's own host."""
    if origin is None:
        return True
    _, _, rest = origin.partition("://")
    return bool(host) and rest.rstrip("/") == host


@dataclass(frozen=True)
class AuditEntry:
    at: float
    user: str
    client: str
    action: str
    target: str
    outcome: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class AuditLog:
    """The operator actions of this UI process: logged, and the latest kept."""

    def __init__(self, keep: int = 1000) -> None:
        self.entries: collections.deque[AuditEntry] = collections.deque(maxlen=keep)

    def record(self, user: str, client: str, action: str, target: str, outcome: str) -> None:
        entry = AuditEntry(time.time(), user, client, action, target, outcome)
        self.entries.append(entry)
        log.info(
            "%s (%s) %s %s: %s",
            user,
            client,
            action,
            target,
            outcome,
            extra={"event": {"event": "web_action", **entry.to_dict()}},
        )
