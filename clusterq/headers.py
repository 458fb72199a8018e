"""Task headers: a small map of strings carried in a task's record beside its payload
(``enqueue(..., headers=...)``, ``task.headers``): trace context, a tenant, a request id.
Stored as the record meta's ``"h"`` (see :mod:`clusterq.task`)."""

from __future__ import annotations

from clusterq.serialization import too_large
from clusterq.task import headers_field

#: At most this many headers, and this many bytes of them (as JSON) per task.
MAX_HEADERS = 64
MAX_HEADERS_BYTES = 8192
#: The longest header name.
MAX_HEADER_NAME = 128


def validate_headers(headers: object) -> bytes:
    """The record's ``"h"`` part for ``headers`` (a small map of strings), or raise a
    ValueError naming what is wrong."""
    if not isinstance(headers, dict):
        raise ValueError(f"headers must be a dict of strings, got {type(headers).__name__}")
    if len(headers) > MAX_HEADERS:
        raise ValueError(f"headers has {len(headers)} entries, more than {MAX_HEADERS}")
    for name, value in headers.items():
        if (
            not isinstance(name, str)
            or not name
            or len(name) > MAX_HEADER_NAME
            or not name.isprintable()
        ):
            raise ValueError(f"header name {str(name)[:40]!r}: a printable string of 1-128 chars")
        if not isinstance(value, str):
            raise ValueError(
                f"header {name!r} must be a string, got {type(value).__name__} {value!r:.40}"
            )
    try:
        part = headers_field(headers)
    except ValueError as exc:  # a lone surrogate: not UTF-8
        raise ValueError(f"headers are not valid text: {exc}") from None
    if len(part) > MAX_HEADERS_BYTES:
        raise too_large(len(part) - 5, MAX_HEADERS_BYTES, "headers")
    return part
