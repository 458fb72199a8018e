"""Workflows across shards: :func:`chain`, :func:`group` and :func:`chord`, nestable,
whose steps (each a :class:`~clusterq.producer.TaskSpec`) may go to any queue, so the
steps of one workflow run on different masters.

- :mod:`.shapes`: what a workflow is (chain, group, chord) and its plan of steps;
- :mod:`.info`: handles, what ``client.info`` / ``workflow inspect`` show, reading;
- :mod:`.run`: starting a workflow (every step checked before anything is written) and
  advancing it (by the worker, before it acknowledges a step's task).

How it stays correct on a cluster:

- The workflow's state is one hash under its own hash tag (``<prefix>:{wf:<id>}``), so
  every change to it is one script on one slot (``broker/workflow.lua``); a step's
  task lives in its own queue's slot. No script crosses slots: advancing a workflow is
  a separate call, made by the worker that finished a step *before* it acknowledges the
  step's task. A large workflow is written in parts to a staging hash renamed at the
  end: nobody sees half a workflow.
- Step ids are the step's place in the tree and the step's task id is
  ``wf:<workflow id>:<step id>``; a step is claimed in the workflow's state before its
  task is enqueued and marked enqueued after. A worker killed in between leaves its
  step's task un-acknowledged: it runs again, the advance is repeated, the claimed steps
  come back and their enqueue is answered "already enqueued". Each next step is
  enqueued once, a chord's callback once.
- A workflow follows its client's durability: with ``replica`` (or ``aof``) every
  change of its state and every step's enqueue is confirmed before the step's task is
  acknowledged (or the step is tried again). With ``none`` (the default), a change
  waits briefly for a live replica where the master has one, and goes on without it.
- Every workflow ends, succeeded or failed: a step that cannot be enqueued, or that is
  archived (by its worker or by lease recovery), fails it. An ended workflow's state is
  kept for its retention (default a day), then expires.

Results: a step's result is stored in the workflow's state (JSON), and the next step
receives what it waited for as ``task.parent_results``. A step archived for good fails
the workflow: what has not started is skipped, except a chord's ``on_error`` step, which
runs with the group's errors.
"""

from clusterq.workflow.info import (
    STEP_STATES,
    StepInfo,
    WorkflowFailed,
    WorkflowGone,
    WorkflowHandle,
    WorkflowInfo,
    read_workflow,
    settled,
    workflow_info,
)
from clusterq.workflow.run import (
    BEST_EFFORT_WAIT_MS,
    DEFAULT_RETENTION,
    MAX_PARENT_BYTES,
    MAX_STATE_BYTES,
    MAX_STEPS,
    AsyncWorkflows,
    Workflows,
    with_step,
)
from clusterq.workflow.shapes import (
    Chain,
    Chord,
    Group,
    Node,
    Plan,
    Step,
    Workflow,
    chain,
    chord,
    compile_workflow,
    group,
    step_task_id,
)

__all__ = [
    "BEST_EFFORT_WAIT_MS",
    "DEFAULT_RETENTION",
    "MAX_PARENT_BYTES",
    "MAX_STATE_BYTES",
    "MAX_STEPS",
    "STEP_STATES",
    "AsyncWorkflows",
    "Chain",
    "Chord",
    "Group",
    "Node",
    "Plan",
    "Step",
    "StepInfo",
    "Workflow",
    "WorkflowFailed",
    "WorkflowGone",
    "WorkflowHandle",
    "WorkflowInfo",
    "Workflows",
    "chain",
    "chord",
    "compile_workflow",
    "group",
    "read_workflow",
    "settled",
    "step_task_id",
    "with_step",
    "workflow_info",
]
