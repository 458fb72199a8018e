"""clusterq: background task queues at home on Redis Cluster (and on one Redis node)."""

from __future__ import annotations

__version__ = "0.1.0"

from clusterq.client import Client, DuplicateTask
from clusterq.errors import (
    AuthFailed,
    ClusterqError,
    ConfigError,
    ConnectionFailed,
    InvalidName,
    ModeMismatch,
)
from clusterq.inspector import Inspector, QueueInfo
from clusterq.keys import KeySchema
from clusterq.slots import keyslot
from clusterq.task import TaskInfo, TaskState
from clusterq.topology import Topology

__all__ = [
    "AuthFailed",
    "Client",
    "ClusterqError",
    "ConfigError",
    "ConnectionFailed",
    "DuplicateTask",
    "Inspector",
    "InvalidName",
    "KeySchema",
    "ModeMismatch",
    "QueueInfo",
    "TaskInfo",
    "TaskState",
    "Topology",
    "__version__",
    "keyslot",
]
