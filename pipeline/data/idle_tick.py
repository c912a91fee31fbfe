"""Pauses for Ray Data's scheduling loop where it would step for nothing: :class:`IdleTick` when no
task runs (stream mode's dataset), :class:`QuietTick` after a step in which nothing happened (the
label stage's job, whose tasks take seconds).

Ray Data's streaming executor blocks in ``ray.wait`` (up to 0.1 s) while some task of its runs, but
does not wait at all when none does. In stream mode that is most of an epoch: the row groups ahead
are read, and the executor waits for the training workers to take them. The loop then spins,
updating its metrics and budgets in a tight loop (py-spy on the split coordinator that runs it).
Sampled with ps on 2 vCPUs, that coordinator took about half a core from the two training workers. Ray Data has no
setting for this, so a callback of ours sleeps :data:`IDLE_TICK_S` after each step that found nothing
running. A new read then starts at most that much later, far less than a block takes to read.

Kept apart from :mod:`pipeline.data.streaming` because it imports Ray Data's internals, which the
GPU check's Ray-free machine does not have; the executor imports it by name in its own process.
"""

from __future__ import annotations

import time

from ray.data._internal.execution.execution_callback import ExecutionCallback

IDLE_TICK_S = 0.02


def running_tasks(executor) -> int | None:
    """Tasks the executor has in flight, or None when this Ray version does not say."""
    try:
        return sum(op.num_active_tasks() for op in executor._topology)
    except Exception:  # an executor without these internals: treat it as idle, a tick costs little
        return None


class IdleTick(ExecutionCallback):
    """Sleep :data:`IDLE_TICK_S` after a scheduling step that found no task running."""

    def on_execution_step(self, executor) -> None:
        if not running_tasks(executor):
            time.sleep(IDLE_TICK_S)


# The label stage's teacher actors take seconds per input, and Ray Data queues the next input at
# each actor, so a step that finds nothing new can wait this long without leaving an actor idle.
QUIET_TICK_S = 0.25


def progress_signature(executor) -> tuple | None:
    """What the executor has done so far (tasks submitted, outputs produced, per operator), or None
    when this Ray version does not say."""
    try:
        return tuple((op.metrics.num_tasks_submitted, op.metrics.num_task_outputs_generated) for op in executor._topology)
    except Exception:
        return None


class QuietTick(ExecutionCallback):
    """Sleep :data:`QUIET_TICK_S` after a scheduling step in which nothing happened.

    For jobs of long tasks (the label stage): there ``ray.wait`` returns every 0.1 s with nothing
    done, and each empty step still updates the executor's budgets, metrics and autoscalers. A
    step that submitted a task or got an output back is followed at once by the next. Measured
    with ps on 2 vCPUs (benchmarks/README.md): the label job's task took 16 s of CPU in a 3-minute
    run, 13 s with this pause; py-spy then finds the loop in the pause 70 % of the time (the rest
    of the task's CPU is Ray Data's own 10 ms polling of its output queue)."""

    def __init__(self) -> None:
        self._last: tuple | None = None

    def on_execution_step(self, executor) -> None:
        seen = progress_signature(executor)
        if seen is not None and seen == self._last:
            time.sleep(QUIET_TICK_S)
        self._last = seen
