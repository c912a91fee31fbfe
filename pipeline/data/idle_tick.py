"""A pause for Ray Data's scheduling loop when it has nothing running (stream mode's dataset).

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
