"""clusterq: background task queues at home on Redis Cluster (and on one Redis node)."""

from __future__ import annotations

__version__ = "0.1.0"

from clusterq.aclient import AsyncClient
from clusterq.client import Client
from clusterq.cluster.topology import Topology
from clusterq.errors import (
    AuthFailed,
    ClusterqError,
    ConfigError,
    ConnectionFailed,
    DuplicateTask,
    DurabilityError,
    ForeignData,
    InvalidName,
    ModeMismatch,
    ResultTimeout,
    ShardDown,
    SlotMigrating,
    TaskFailed,
    TaskNotFound,
)
from clusterq.keys import KeySchema
from clusterq.limits import InvalidLimits, Limits
from clusterq.ops.admin import Admin, AsyncAdmin
from clusterq.ops.inspector import Inspector, QueueInfo
from clusterq.partitions import Layout
from clusterq.producer import TaskSpec
from clusterq.retry import RateLimited, RetryIn, SkipRetry
from clusterq.router import Router
from clusterq.scheduler import Periodic, Scheduler
from clusterq.serialization import PayloadError
from clusterq.slots import keyslot
from clusterq.streams import Event, Published, StreamLayout
from clusterq.task import Task, TaskInfo, TaskState
from clusterq.taskevents import TaskEvent
from clusterq.typed import TaskDef
from clusterq.worker import Worker, current_worker
from clusterq.workflow import WorkflowFailed, WorkflowHandle, chain, chord, group

__all__ = [
    "Admin",
    "AsyncAdmin",
    "AsyncClient",
    "AuthFailed",
    "Client",
    "ClusterqError",
    "ConfigError",
    "ConnectionFailed",
    "DuplicateTask",
    "DurabilityError",
    "Event",
    "ForeignData",
    "Inspector",
    "InvalidLimits",
    "InvalidName",
    "KeySchema",
    "Layout",
    "Limits",
    "ModeMismatch",
    "PayloadError",
    "Periodic",
    "Published",
    "QueueInfo",
    "RateLimited",
    "ResultTimeout",
    "RetryIn",
    "Router",
    "Scheduler",
    "ShardDown",
    "SkipRetry",
    "SlotMigrating",
    "StreamLayout",
    "Task",
    "TaskDef",
    "TaskEvent",
    "TaskFailed",
    "TaskInfo",
    "TaskNotFound",
    "TaskSpec",
    "TaskState",
    "Topology",
    "Worker",
    "WorkflowFailed",
    "WorkflowHandle",
    "__version__",
    "chain",
    "chord",
    "current_worker",
    "group",
    "keyslot",
]
