"""What a user sees while a stage trains: one plain line per epoch when the output is not a
terminal (no epoch twice after a restart), a live bar on a terminal; the closing summary and its
commands; the libraries' chatter quieted unless --verbose."""

import io
import logging
import queue as stdlib_queue
from types import SimpleNamespace

import pytest

from pipeline import console, summary


class _Queue:
    """The part of ray.util.queue.Queue the display uses, in process."""

    def __init__(self):
        self.q = stdlib_queue.Queue()

    def put_nowait(self, item):
        self.q.put_nowait(item)

    def get(self, timeout=None):
        return self.q.get(timeout=timeout)

    def qsize(self):
        return self.q.qsize()

    def get_nowait_batch(self, n):
        return [self.q.get_nowait() for _ in range(n)]


def _epoch(e, acc):
    return {"epoch": e, "train_loss": 1.0 / e, "val_top1": acc, "images_per_s": 120.0, "epoch_time_s": 4.0}


def test_plain_lines_one_per_epoch_and_a_rerun_epoch_is_not_printed_twice():
    out = io.StringIO()
    display = console.ProgressDisplay("baseline resnet10t", 3, lines=out, live=False, queue=_Queue())
    with display:
        sender = display.sender
        for step in range(5):
            sender.step(0, step, 5, lambda: 1.5)  # step events draw nothing without a terminal
        sender.epoch(_epoch(1, 0.5), 5)
        sender.epoch(_epoch(2, 0.6), 5)
        sender.resumed(1)  # a worker died after epoch 2 was reported but before its checkpoint
        sender.epoch(_epoch(2, 0.6), 5)
        sender.epoch(_epoch(3, 0.7), 5)
    lines = out.getvalue().splitlines()
    assert lines == [
        "baseline resnet10t: epoch 1/3 loss 1.0000 val_top1 0.500 120 img/s 4.0 s, ETA " + lines[0].rsplit("ETA ", 1)[1],
        "baseline resnet10t: epoch 2/3 loss 0.5000 val_top1 0.600 120 img/s 4.0 s, ETA " + lines[1].rsplit("ETA ", 1)[1],
        "baseline resnet10t: resuming after epoch 1 (from the last checkpoint)",
        "baseline resnet10t: epoch 3/3 loss 0.3333 val_top1 0.700 120 img/s 4.0 s",
    ]
    assert all(":" in line.rsplit("ETA ", 1)[1] for line in lines[:2])  # m:ss


def test_live_bar_advances_with_steps_and_epochs(monkeypatch):
    bar_out = io.StringIO()
    monkeypatch.setattr(console.sys, "stderr", bar_out)
    display = console.ProgressDisplay("teacher lite0", 2, lines=io.StringIO(), live=True, queue=_Queue())
    display.show({"kind": "step", "epoch": 0, "step": 3, "steps": 10, "loss": 1.25})
    assert display._bar.n == 3 and "loss 1.2500" in str(display._bar.postfix)
    display.show({"kind": "epoch", "steps": 10, **_epoch(1, 0.8)})
    assert display._bar.n == 10 and "val_top1 0.800" in str(display._bar.postfix)
    display.show({"kind": "step", "epoch": 1, "step": 10, "steps": 10, "loss": 0.5})
    assert display._bar.n == display._bar.total == 20
    display._bar.close()
    assert "teacher lite0" in bar_out.getvalue()


def test_step_events_are_throttled():
    q = _Queue()
    sender = console.ProgressSender(q)
    calls = []
    for step in range(100):
        sender.step(0, step, 100, lambda: calls.append(1) or 1.0)
    # the first step and the last of the epoch always go; in between, at most one per interval
    assert 2 <= q.qsize() <= 3 and len(calls) == q.qsize()


def test_the_summary_names_each_model_its_accuracy_and_the_commands():
    results = {
        "preprocess": {"split_sizes": {"train": 80, "val": 20, "test": 0}, "class_names": ["a", "b"], "reused": True,
                       "shard_dir": "/o/shards/x"},
        "teacher": {"stage": "teacher", "role": "teacher", "arch": "tf_efficientnet_lite0", "metrics": {"val_top1": 0.95}, "seconds": 41.2, "best_checkpoint": "/o/teacher/best"},
        "distill": {"stage": "distill", "role": "deit-soft", "arch": "deit_tiny", "metrics": {"val_top1": 0.8125, "val_agreement": 0.9}, "skipped": True, "best_checkpoint": "/o/distill/deit-soft/best"},
        "baseline": {"stage": "distill", "role": "baseline", "arch": "deit_tiny", "metrics": {"val_top1": 0.75}, "seconds": 46.4,
                     "label_seconds": None, "best_checkpoint": "/o/distill/baseline/best"},
        "mlflow": {"tracking_uri": "sqlite:////o/mlflow.db", "experiment": "demo", "experiment_id": "3", "parent_run_id": "abc"},
    }
    buf = io.StringIO()
    import contextlib

    with contextlib.redirect_stdout(buf):
        summary.print_run_summary(results, SimpleNamespace(config="configs/demo.yaml", overrides=["output_dir=/o"]))
    lines = buf.getvalue().splitlines()
    rows = {line.split()[0]: line.split() for line in lines[1:5]}
    assert rows["teacher"][1:5] == ["tf_efficientnet_lite0", "0.950", "-", "41"]
    assert rows["deit-soft"][1:5] == ["deit_tiny", "0.812", "0.900", "reused"]
    assert rows["baseline"][1:6] == ["deit_tiny", "0.750", "-", "46", "s"]
    assert "experiment 'demo', parent run abc" in lines[5]
    assert ("ui --backend-store-uri sqlite:////o/mlflow.db --port 5000, then open "
            "http://127.0.0.1:5000/#/experiments/3?workflowType=machine_learning") in lines[6]
    assert lines[7].endswith("-m pipeline report --config configs/demo.yaml output_dir=/o")


def test_a_students_time_says_how_much_of_it_was_the_label_step():
    row = summary.training_row({"stage": "distill", "role": "deit-soft", "arch": "deit_tiny", "metrics": {"val_top1": 0.7},
                                "seconds": 77.2, "label_seconds": 24.4, "best_checkpoint": "/o/b"})
    assert row[4] == "77 s (24 s label)"
    reused = summary.training_row({"stage": "distill", "role": "deit-soft", "arch": "deit_tiny", "metrics": {}, "skipped": True,
                                   "seconds": 77.2, "label_seconds": 24.4, "best_checkpoint": "/o/b"})
    assert reused[4] == "reused"


def test_a_remote_server_is_opened_directly():
    hint = summary.mlflow_ui_hint("http://mlflow.internal:5000/", "7")
    assert hint == "open http://mlflow.internal:5000/#/experiments/7?workflowType=machine_learning"


@pytest.mark.parametrize("verbose", [False, True])
def test_library_chatter_is_quiet_unless_verbose(verbose, monkeypatch):
    name = "ray.data._internal.execution.streaming_executor"
    monkeypatch.setattr(logging.getLogger(name), "level", logging.NOTSET)
    monkeypatch.setattr(console, "_VERBOSE", verbose)
    console.quiet_library_chatter()
    assert logging.getLogger(name).getEffectiveLevel() >= logging.WARNING or verbose
    assert (logging.getLogger(name).level == logging.NOTSET) == verbose


def test_counted_progress_prints_a_line_per_quarter_when_not_a_terminal():
    lines = io.StringIO()
    progress = console.CountProgress("label", 100, "views", lines=lines, live=False)
    for n in (10, 10, 10, 40, 29):  # 10, 20, 30, 70 (two quarters at once: one line), 99
        progress.advance(n)
    progress.advance(50)  # more than announced is capped at the total; the end is the stage's own line
    progress.close()
    printed = lines.getvalue().splitlines()
    assert [line.split(",")[0] for line in printed] == ["label: 30/100 views (30 %)", "label: 70/100 views (70 %)",
                                                        "label: 99/100 views (99 %)"]
    assert all("ETA" in line for line in printed)
    assert progress.done == 100


def test_counted_progress_draws_a_bar_on_a_terminal(monkeypatch, capsys):
    progress = console.CountProgress("label", 8, "views", live=True)
    progress.advance(3)
    progress.advance(5)
    assert progress._bar.n == 8
    progress.close()  # the bar clears itself: the stage's closing line follows
    assert "label:" in capsys.readouterr().err
