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


class ShardDown(ConnectionFailed):
    """The master of a slot is down and no replica is left to take over (or, with
    ``cluster-require-full-coverage yes``, another shard is, and the cluster refuses
    everything): retrying would only wait. The message names the shard and its queues."""


class SlotMigrating(ConnectionFailed):
    """A queue's slot is being migrated between masters (resharding) and the call's
    retries ran out: Redis refuses a multi-key command (every clusterq script) while the
    queue's keys are split between the two nodes or the slot is still marked migrating.
    The message names the slot, its queues and where the slot is going."""


class AuthFailed(ClusterqError):
    """The server refused the username/password."""


class ModeMismatch(ClusterqError):
    """``--cluster`` against a standalone server, or ``--standalone`` against a cluster."""


class ForeignData(ClusterqError):
    """A key clusterq uses holds what clusterq does not write there (another type, a
    value it cannot read), written by something else. The message names the key; the
    call that met it changed nothing."""


class TopologyError(ClusterqError):
    """The cluster map could not be read or makes no sense."""


class ServerBinaryNotFound(ClusterqError):
    """No redis-server / valkey-server binary could be found."""


class DevClusterError(ClusterqError):
    """The local development cluster could not be started, checked or stopped."""


class DuplicateTask(ClusterqError):
    """A unique task with the same type, payload and queue is already enqueued."""

    def __init__(self, message: str, existing_id: str) -> None:
        super().__init__(message)
        self.existing_id = existing_id


class TaskNotFound(ClusterqError, LookupError):
    """No task with that id in that queue."""


class TaskFailed(ClusterqError):
    """The task was archived after its last attempt failed; ``last_error`` says why."""

    def __init__(self, message: str, last_error: str | None) -> None:
        super().__init__(message)
        self.last_error = last_error


class ResultTimeout(ClusterqError, TimeoutError):
    """The task did not complete within the time given to wait for its result."""


class DurabilityError(ClusterqError):
    """The master took the write but no replica confirmed it in time.

    The tasks may still be there, or may be lost if the master fails now. Enqueue them
    again with the same ``task_id``s: that is safe, and confirms them once replicated.
    """

    def __init__(self, message: str, task_ids: list[str], replicas: int) -> None:
        super().__init__(message)
        self.task_ids = task_ids
        self.replicas = replicas
