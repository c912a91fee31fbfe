"""What the console shows: training progress on the driver (a live bar on a terminal, one plain line
per epoch otherwise), and whether Ray's own chatter is let through (``--verbose``).

Ray Train runs the loop in worker processes and its callbacks in a controller actor, so neither can
draw on the driver's terminal. Rank 0 sends small progress events through a Ray queue (an actor
that reserves no CPU) and a thread on the driver renders them with tqdm. Without a terminal (a file,
``ray job logs``) each epoch is one line, and nothing else is printed.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from contextlib import contextmanager
from typing import Any, TextIO

_VERBOSE = False


def set_verbose(on: bool) -> None:
    """``--verbose``: let Ray's per-report, checkpoint and worker lines reach the console again."""
    global _VERBOSE
    _VERBOSE = on


def verbose() -> bool:
    return _VERBOSE


#: Loggers whose lines say nothing a user of this pipeline can act on, and why each is quieted:
_QUIET_LOGGERS = {
    # "Token authentication is enabled ... set RAY_AUTH_MODE=disabled to opt out": the pipeline wants it on.
    "ray._private.authentication.authentication_token_setup": logging.ERROR,
    # "Progress bars disabled": chosen by us when the console is not a terminal (a file gets no bars).
    "ray.data._internal.progress": logging.ERROR,
    # "Dataset ... execution finished in N s": the preprocess stage prints its own end line.
    "ray.data._internal.execution.streaming_executor": logging.WARNING,
    # "Creating initial MLflow database tables" / "Updating database tables": a new SQLite store, nothing to do.
    "mlflow.store.db.utils": logging.WARNING,
    "alembic.runtime.migration": logging.WARNING,
}


def quiet_library_chatter() -> None:
    """Quiet the loggers in :data:`_QUIET_LOGGERS` (all of them stay as they were with ``--verbose``)."""
    if _VERBOSE:
        return
    for name, level in _QUIET_LOGGERS.items():
        logging.getLogger(name).setLevel(level)


@contextmanager
def mlflow_quiet():
    """MLflow prints "Successfully registered model" / "Created version" with no logger to quiet;
    the stage's own end line says which version it registered."""
    from mlflow.utils import logging_utils

    stream = logging_utils.MLFLOW_LOGGING_STREAM
    was = stream.enabled
    if not _VERBOSE:
        stream.enabled = False
    try:
        yield
    finally:
        stream.enabled = was


#: seconds between step events from rank 0 (each costs a round trip to the queue actor and a device sync)
STEP_EVENT_INTERVAL_S = 1.0


class ProgressSender:
    """The worker side: rank 0 calls :meth:`step` every step and :meth:`epoch` once an epoch is reported."""

    def __init__(self, queue):
        self.queue = queue
        self._last = 0.0

    def _send(self, event: dict[str, Any]) -> None:
        try:
            actor = getattr(self.queue, "actor", None)
            if actor is not None:
                # Fire and forget: Queue.put_nowait waits for the actor's answer, a round trip per
                # event that the training step would pay.
                actor.put_nowait.remote(event)
            else:
                self.queue.put_nowait(event)
        except Exception:  # a full or vanished queue costs the display, never the training
            pass

    def step(self, epoch: int, step: int, steps: int, loss_fn) -> None:
        """``loss_fn()`` gives the running loss; called only when an event is due (it syncs the device)."""
        now = time.monotonic()
        if now - self._last < STEP_EVENT_INTERVAL_S and step + 1 < steps:
            return
        self._last = now
        self._send({"kind": "step", "epoch": epoch, "step": step + 1, "steps": steps, "loss": float(loss_fn())})

    def epoch(self, metrics: dict[str, Any], steps: int) -> None:
        keep = ("epoch", "train_loss", "train_top1", "val_top1", "images_per_s", "epoch_time_s")
        self._send({"kind": "epoch", "steps": steps, **{k: metrics[k] for k in keep if k in metrics}})

    def resumed(self, after_epoch: int) -> None:
        self._send({"kind": "resumed", "epoch": after_epoch})


class ProgressDisplay:
    """The driver side: ``with ProgressDisplay(label, epochs) as display:`` around ``trainer.fit()``;
    ``display.sender`` goes to the workers."""

    def __init__(self, label: str, epochs: int, lines: TextIO | None = None, live: bool | None = None, queue=None):
        self.label, self.epochs = label, epochs
        self.lines = lines or sys.stdout  # plain epoch lines, with the stages' other lines
        self.live = sys.stderr.isatty() if live is None else live  # the bar draws on stderr
        if queue is None:
            from ray.util.queue import Queue

            queue = Queue(maxsize=10_000, actor_options={"num_cpus": 0})
        self.queue = queue
        self.sender = ProgressSender(self.queue)
        self.printed_epoch = 0  # an epoch re-run after a restart is not printed twice
        self.started = time.monotonic()
        self._bar = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._pump, name="progress", daemon=True)

    def __enter__(self) -> "ProgressDisplay":
        self.started = time.monotonic()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._drain()
        if self._bar is not None:
            self._bar.close()
        try:
            import ray

            ray.kill(self.queue.actor)
        except Exception:  # a test's stand-in queue, or Ray already shut down
            pass

    def _pump(self) -> None:
        while not self._stop.is_set():
            self._drain(timeout=0.5)

    def _drain(self, timeout: float | None = None) -> None:
        try:
            events = self.queue.get_nowait_batch(self.queue.qsize()) if timeout is None else [self.queue.get(timeout=timeout)]
        except Exception:  # Empty after the timeout, or the queue is gone at shutdown
            return
        for event in events:
            self.show(event)

    def show(self, event: dict[str, Any]) -> None:
        """Render one event (public for tests: no Ray needed to see what a user would see)."""
        kind = event["kind"]
        if kind == "resumed":
            # A restarted worker group or a resubmitted run: both continue from the last checkpoint.
            self._write(f"{self.label}: resuming after epoch {event['epoch']} (from the last checkpoint)")
        elif kind == "step" and self.live:
            self._live_bar(event["steps"]).update((event["epoch"] * event["steps"] + event["step"]) - self._bar.n)
            self._bar.set_postfix_str(f"epoch {event['epoch'] + 1}/{self.epochs} loss {event['loss']:.4f}", refresh=True)
        elif kind == "epoch" and event["epoch"] > self.printed_epoch:
            self.printed_epoch = event["epoch"]
            self._epoch_line(event)

    def _live_bar(self, steps: int):
        if self._bar is None:
            from tqdm import tqdm

            self._bar = tqdm(total=self.epochs * steps, desc=self.label, unit="step", file=sys.stderr, dynamic_ncols=True,
                             leave=True)
        return self._bar

    def _epoch_line(self, e: dict[str, Any]) -> None:
        done = e["epoch"]
        eta = (time.monotonic() - self.started) / max(done, 1) * (self.epochs - done)
        text = (f"epoch {done}/{self.epochs} loss {e.get('train_loss', float('nan')):.4f} "
                f"val_top1 {e.get('val_top1', float('nan')):.3f} {e.get('images_per_s', 0):.0f} img/s "
                f"{e.get('epoch_time_s', 0):.1f} s" + (f", ETA {_clock(eta)}" if done < self.epochs else ""))
        if self.live:
            bar = self._live_bar(e["steps"])
            bar.update(done * e["steps"] - bar.n)
            bar.set_postfix_str(text, refresh=True)
        else:
            self._write(f"{self.label}: {text}")

    def _write(self, line: str) -> None:
        if self._bar is not None:
            self._bar.write(line, file=sys.stderr)
        else:
            print(line, file=self.lines, flush=True)


class CountProgress:
    """Progress of a job counted in items (the label step's views): a live bar on a terminal's stderr,
    elsewhere (a log, ``ray job submit``) one line at each quarter, so logs stay short."""

    def __init__(self, label: str, total: int, unit: str, lines: TextIO | None = None, live: bool | None = None):
        self.label, self.total, self.unit = label, max(1, total), unit
        self.lines = lines or sys.stdout
        self.live = sys.stderr.isatty() if live is None else live
        self.done, self.quarter = 0, 0
        self.started = time.monotonic()
        self._bar = None
        if self.live:
            from tqdm import tqdm

            self._bar = tqdm(total=self.total, desc=label, unit=unit, file=sys.stderr, dynamic_ncols=True, leave=False)

    def advance(self, n: int) -> None:
        self.done = min(self.total, self.done + n)
        if self._bar is not None:
            self._bar.update(self.done - self._bar.n)
            return
        quarter = self.done * 4 // self.total
        if quarter > self.quarter and self.done < self.total:  # the stage's own line reports the end
            self.quarter = quarter
            elapsed = time.monotonic() - self.started
            eta = elapsed / self.done * (self.total - self.done)
            print(f"{self.label}: {self.done}/{self.total} {self.unit} ({100 * self.done // self.total} %), "
                  f"{_clock(elapsed)} so far, ETA {_clock(eta)}", file=self.lines, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def _clock(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    return f"{m // 60}:{m % 60:02d}:{s:02d}" if m >= 60 else f"{m}:{s:02d}"
