"""MLflow: one parent run per invocation, one nested run per stage, metrics from rank 0.

Tracking must never kill training: every call goes through :func:`attempt`, which retries, warns
and, when the server stays away, keeps what could not be sent (metrics are re-sent with the next
call; anything still unsent at the end is written to ``mlflow_unsent.jsonl`` in the stage's output
directory). ``tracking.fail_fast=true`` turns that into an error instead.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
import warnings
from contextlib import contextmanager
from typing import Any, Callable, Iterator

from pipeline.config import PipelineConfig, flatten, redact, to_dict

# MLflow's HTTP client retries for minutes by default; we retry (and buffer) ourselves.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")


class TrackingError(RuntimeError):
    """MLflow was unreachable and ``tracking.fail_fast`` is set."""


def tracking_uri(cfg: PipelineConfig) -> str:
    """``tracking.uri``, else ``MLFLOW_TRACKING_URI``, else ``mlflow.db`` in the base directory (the
    current one, where ``mlflow ui`` looks by default; see ``config.base_dir`` for Ray jobs)."""
    from pipeline.config import absolute_tracking_uri, base_dir

    env = absolute_tracking_uri(os.environ.get("MLFLOW_TRACKING_URI"))
    return cfg.tracking.uri or env or f"sqlite:///{os.path.join(base_dir(), 'mlflow.db')}"


def artifact_location(uri: str) -> str | None:
    """Where a new experiment keeps its artifacts: beside a SQLite store (``<db dir>/mlruns``).

    MLflow's default for database stores is ``./mlruns`` in the *current* directory, which inside a
    Ray job is the temporary copy of the working directory: models and plots would vanish with it.
    Servers choose their own artifact root (None).
    """
    if uri.startswith("sqlite:///"):
        db_path = uri[len("sqlite:///"):]
        return os.path.join(os.path.dirname(os.path.abspath(db_path)), "mlruns")
    return None


_READY_STORES: set[str] = set()


def ready_store(uri: str) -> None:
    """Create or upgrade a local SQLite store's tables once per process, one process at a time.

    MLflow migrates a new SQLite file when a client first opens it, with no lock of its own: two
    runs started together on a fresh ``mlflow.db`` both migrate it, one fails, and the file can be
    left half-migrated (a stray ``_alembic_tmp_*`` table) and refused by every later run. An
    ``flock`` on a hidden file beside the database serialises that first opening; later ones find
    the tables in place. Failures are left to the callers' :func:`attempt`, which reports them.
    """
    if not uri.startswith("sqlite:///") or uri in _READY_STORES:
        return
    from mlflow.tracking import MlflowClient
    from sqlalchemy.engine import make_url

    from pipeline import storage

    try:  # the file as SQLAlchemy opens it: percent-decoded, without the ?query
        database = make_url(uri).database
    except Exception:
        return
    if not database or database.startswith(":memory:") or database.startswith("file:"):
        return
    db = os.path.abspath(database)
    try:
        with storage.build_lock(os.path.join(os.path.dirname(db), f".{os.path.basename(db)}.lock")):
            MlflowClient(uri).search_experiments(max_results=1)
    except Exception:
        return
    _READY_STORES.add(uri)


def attempt(fn: Callable[[], Any], what: str, fail_fast: bool, tries: int = 3, wait: float = 1.0) -> tuple[bool, Any]:
    """Call ``fn`` up to ``tries`` times (waiting ``wait``, then twice as long, between tries): ``(True, result)``.

    When every try fails: a warning that MLflow could not ``what`` and ``(False, None)``, or TrackingError with ``fail_fast``."""
    for i in range(tries):
        try:
            return True, fn()
        except Exception as exc:  # network errors, server errors: all mean "not sent"
            last = exc
            if i + 1 < tries:
                time.sleep(wait * (2**i))
    if fail_fast:
        raise TrackingError(redact(f"MLflow: could not {what}: {last}")) from last
    warnings.warn(redact(f"MLflow: could not {what} ({type(last).__name__}: {str(last)[:200]}); training goes on"), stacklevel=3)
    return False, None


#: MLflow 3 opens an experiment on its GenAI overview unless told it holds model training.
EXPERIMENT_KIND_TAG, EXPERIMENT_KIND = "mlflow.experimentKind", "custom_model_development"
#: the config sections every training stage's run logs as parameters, besides its own
STAGE_SHARED_SECTIONS = ("data", "train", "ray")


def model_alias(role: str) -> str:
    """A registry alias for ``role``: MLflow allows word characters and '-', and reserves ``latest`` and ``v<N>``."""
    alias = re.sub(r"[^\w-]", "-", role)
    return f"{alias}-model" if alias == "latest" or re.fullmatch(r"[vV]\d+", alias) else alias


def git_commit() -> str:
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5).stdout.strip() or "unknown"
    except Exception:
        return "unknown"


class EpochLogger:
    """Rank 0's metric logger: batches per epoch, buffers across outages, never raises unless fail_fast."""

    def __init__(self, uri: str | None, run_id: str | None, fail_fast: bool = False, fallback_path: str | None = None,
                 once_per_step: bool = True):
        self.uri, self.run_id, self.fail_fast, self.fallback_path = uri, run_id, fail_fast, fallback_path
        self.pending: list[tuple[str, float, int, int]] = []
        self.logged_steps: set[int] | None = None if once_per_step else set()
        self.once_per_step = once_per_step

    def _already_logged(self) -> set[int]:
        """Epochs this run already holds (a restarted attempt may redo an epoch whose checkpoint
        Ray had not registered when the worker died): each epoch is logged exactly once."""
        if self.logged_steps is None:
            from mlflow.tracking import MlflowClient

            ok, history = attempt(lambda: MlflowClient(self.uri).get_metric_history(self.run_id, "train_loss"),
                                   "read the run's metric history", self.fail_fast, tries=2)
            self.logged_steps = {m.step for m in history} if ok else set()
        return self.logged_steps

    def log(self, metrics: dict[str, float], step: int) -> None:
        if not self.run_id:  # no MLflow run at all: everything goes to the unsent file at close()
            ts = int(time.time() * 1000)
            self.pending += [(k, float(v), ts, step) for k, v in metrics.items() if isinstance(v, (int, float))]
            return
        if self.once_per_step and step in self._already_logged():
            return
        if self.once_per_step:
            self.logged_steps.add(step)
        ts = int(time.time() * 1000)
        self.pending += [(k, float(v), ts, step) for k, v in metrics.items() if isinstance(v, (int, float))]
        self.flush(tries=2)

    def flush(self, tries: int = 3) -> bool:
        if not self.pending:
            return True
        if not self.run_id:
            return False
        from mlflow.entities import Metric
        from mlflow.tracking import MlflowClient

        batch = [Metric(k, v, ts, step) for k, v, ts, step in self.pending]

        def send():
            client = MlflowClient(self.uri)
            for i in range(0, len(batch), 1000):
                client.log_batch(self.run_id, metrics=batch[i : i + 1000])

        ok, _ = attempt(send, f"log {len(batch)} metric values", self.fail_fast, tries=tries)
        if ok:
            self.pending = []
        return ok

    def close(self) -> None:
        if not self.flush(tries=5 if self.run_id else 0) and self.fallback_path:
            from pipeline import storage

            storage.append_text(self.fallback_path, "".join(
                json.dumps({"run_id": self.run_id, "key": k, "value": v, "timestamp": ts, "step": step}) + "\n"
                for k, v, ts, step in self.pending))
            warnings.warn(f"MLflow: {len(self.pending)} metric values kept in {self.fallback_path}", stacklevel=2)


class Tracker:
    """The invocation's parent run and its nested stage runs."""

    def __init__(self, cfg: PipelineConfig, invocation: str):
        self.cfg, self.invocation = cfg, invocation
        self.uri = tracking_uri(cfg)
        self.fail_fast = cfg.tracking.fail_fast
        self.parent_id: str | None = None
        self.experiment_id: str | None = None

    @classmethod
    def attach(cls, cfg: PipelineConfig, uri: str, experiment_id: str | None, parent_id: str | None) -> "Tracker":
        """A tracker for a process that joins runs created elsewhere (a sweep trial)."""
        tracker = cls(cfg, "trial")
        tracker.uri, tracker.experiment_id, tracker.parent_id = uri, experiment_id, parent_id
        return tracker

    def _client(self):
        from mlflow.tracking import MlflowClient

        ready_store(self.uri)
        return MlflowClient(self.uri)

    def start(self) -> "Tracker":
        from pipeline.console import quiet_library_chatter

        quiet_library_chatter()

        def create():
            client = self._client()
            exp = client.get_experiment_by_name(self.cfg.tracking.experiment)
            exp_id = exp.experiment_id if exp else client.create_experiment(self.cfg.tracking.experiment,
                                                                            artifact_location=artifact_location(self.uri),
                                                                            tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
            if exp and EXPERIMENT_KIND_TAG not in exp.tags:
                client.set_experiment_tag(exp_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
            run = client.create_run(exp_id, run_name=f"{self.invocation}", tags={"pipeline.invocation": self.invocation, "git_commit": git_commit()})
            if not exp_id or not run.info.run_id:  # a proxy or a wrong server that answers 200 with nothing in it
                raise TrackingError(f"the store answered without an experiment or run id (experiment {exp_id!r}, run {run.info.run_id!r})")
            client.get_run(run.info.run_id)  # and it must be able to read back what it just stored
            return exp_id, run.info.run_id

        ok, got = attempt(create, f"create the parent run at {redact(self.uri)}", self.fail_fast)
        if not ok:
            from pipeline import storage
            from pipeline.config import base_dir

            # SQLite needs a local file: beside the outputs, or in the base directory when they are in an object store.
            local_root = base_dir() if storage.is_uri(self.cfg.output_dir) else self.cfg.output_dir
            fallback = f"sqlite:///{os.path.abspath(os.path.join(local_root, 'mlflow_fallback.db'))}"
            if fallback != self.uri:
                os.makedirs(os.path.abspath(local_root), exist_ok=True)
                warnings.warn(f"MLflow at {redact(self.uri)} is unreachable or unusable: this invocation logs to the local store {fallback} "
                              f"instead (`mlflow ui --backend-store-uri {fallback}` shows it)", stacklevel=2)
                self.uri = fallback
                ok, got = attempt(create, f"create the parent run at {self.uri}", self.fail_fast)
        if ok:
            self.experiment_id, self.parent_id = got
            self.log_params(self.parent_id, flatten(to_dict(self.cfg)))
        return self

    def stage_run(self, stage: str, tags: dict[str, str], reuse_id: str | None = None, cfg: PipelineConfig | None = None,
                  run_name: str | None = None) -> str | None:
        """A nested run for ``stage`` (or ``reuse_id`` when resuming one that still exists), named
        ``run_name`` (default: its ``role`` tag), with the parameters of ``cfg`` (default: the
        invocation's) that shape this stage."""
        if self.experiment_id is None:
            return None

        def create():
            client = self._client()
            if reuse_id:
                try:
                    run = client.get_run(reuse_id)
                    if run.info.lifecycle_stage == "active":
                        client.set_terminated(reuse_id, "RUNNING")
                        return reuse_id
                except Exception:
                    pass
            all_tags = {"stage": stage, "git_commit": git_commit(), **tags}
            if self.parent_id:
                all_tags["mlflow.parentRunId"] = self.parent_id
            return client.create_run(self.experiment_id, run_name=run_name or tags.get("role", stage), tags=all_tags).info.run_id

        ok, run_id = attempt(create, f"create the {stage} run", self.fail_fast)
        if ok and run_id != reuse_id:
            tree = to_dict(cfg or self.cfg)
            # A training stage logs its own section and the shared ones: the other training section
            # would only add noise to a comparison (a teacher has no distill.type). Other runs (a
            # sweep's parent) log the whole tree.
            keep = (stage, *STAGE_SHARED_SECTIONS) if stage in ("teacher", "distill") else tuple(tree)
            self.log_params(run_id, flatten({k: v for k, v in tree.items() if k in keep}))
        return run_id if ok else None

    def log_params(self, run_id: str | None, params: dict[str, Any]) -> None:
        if not run_id:
            return
        from mlflow.entities import Param

        items = [Param(k, redact(str(v))[:6000]) for k, v in params.items()]  # never a password as a param

        def send():
            client = self._client()
            for i in range(0, len(items), 100):
                client.log_batch(run_id, params=items[i : i + 100])

        attempt(send, "log parameters", self.fail_fast)

    def log_artifact(self, run_id: str | None, path: str, artifact_path: str | None = None) -> None:
        if run_id:
            attempt(lambda: self._client().log_artifact(run_id, path, artifact_path), f"log artifact {os.path.basename(path)}", self.fail_fast)

    def set_tags(self, run_id: str | None, tags: dict[str, str]) -> None:
        if run_id:
            attempt(lambda: [self._client().set_tag(run_id, k, str(v)) for k, v in tags.items()], "set tags", self.fail_fast)

    def end(self, run_id: str | None, status: str = "FINISHED") -> None:
        if run_id:
            attempt(lambda: self._client().set_terminated(run_id, status), "end a run", self.fail_fast)

    def log_model(self, run_id: str | None, model, meta: dict[str, Any], example, registered_name: str | None,
                  version_tags: dict[str, str] | None = None, description: str | None = None) -> tuple[str | None, str | None]:
        """Log the model to the run in the pickle-free format of :mod:`pipeline.model_store` (state
        dict + meta + signature), registered as ``registered_name``; returns the model URI and the
        registered version (None when not registered).

        The new version carries ``version_tags`` (role, method, val top-1, ...) and ``description``,
        and the alias of its ``role`` tag moves to it, so ``models:/NAME@baseline`` is always the
        latest baseline, whatever its version number."""
        if not run_id:
            return None, None
        import mlflow
        import torch

        from pipeline import model_store

        from pipeline.console import mlflow_quiet

        def send():
            mlflow.set_tracking_uri(self.uri)
            with mlflow.start_run(run_id=run_id), mlflow_quiet():
                return model_store.log_model(
                    model, meta, example, registered_name if self.cfg.tracking.register_models else None,
                    requirements=[f"torch=={torch.__version__.split('+')[0]}", "timm"])

        ok, logged = attempt(send, "log the model", self.fail_fast, tries=2)
        if not ok:
            return None, None
        uri, version = logged
        if version is not None and registered_name:
            self._describe_version(registered_name, str(version), version_tags or {}, description)
        return uri, None if version is None else str(version)

    def _describe_version(self, name: str, version: str, tags: dict[str, str], description: str | None) -> None:
        def send():
            client = self._client()
            for key, value in tags.items():
                client.set_model_version_tag(name, version, key, redact(str(value)))
            if description:
                client.update_model_version(name, version, description=description)
            if tags.get("role"):
                client.set_registered_model_alias(name, model_alias(tags["role"]), version)

        attempt(send, f"describe version {version} of {name}", self.fail_fast)

    def finish(self, status: str = "FINISHED") -> None:
        self.end(self.parent_id, status)


@contextmanager
def tracked(cfg: PipelineConfig, invocation: str) -> Iterator[Tracker]:
    tracker = Tracker(cfg, invocation).start()
    try:
        yield tracker
    except BaseException as exc:
        tracker.finish(end_status(exc))
        raise
    tracker.finish()


def end_status(exc: BaseException) -> str:
    """MLflow's status for a run that ended with ``exc``: KILLED when stopped (Ctrl-C, `ray job stop`), else FAILED."""
    return "KILLED" if isinstance(exc, (KeyboardInterrupt, SystemExit)) else "FAILED"
