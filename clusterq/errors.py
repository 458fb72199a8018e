"""Every error clusterq raises on purpose derives from :class:`ClusterqError`.

Each message is one line that names the problem, so the CLI can print it as it is.
"""

from __future__ import annotations


class ClusterqError(Exception):
    """Base class of clusterq's own errors."""


class InvalidName(ClusterqError, ValueError):
    """A queue name, key prefix or task id that clusterq cannot use as part of a key."""


class ConfigError(ClusterqError, ValueError):
    """A malformed URL or option."""


class ConnectionFailed(ClusterqError):
    """No node could be reached (refused, timed out, unknown host)."""


class AuthFailed(ClusterqError):
    """The server refused the username/password."""


class ModeMismatch(ClusterqError):
    """``--cluster`` against a standalone server, or ``--standalone`` against a cluster."""


class TopologyError(ClusterqError):
    """The cluster map could not be read or makes no sense."""


class ServerBinaryNotFound(ClusterqError):
    """No redis-server / valkey-server binary could be found."""


class DevClusterError(ClusterqError):
    """The local development cluster could not be started, checked or stopped."""
