"""Which runs the report measures: one FINISHED stage run per role (rule in the package docstring)."""

from __future__ import annotations

from typing import Any

STAGES = ("teacher", "distill")
# Fixed roles first, in the order one reads a distillation comparison; funmatch-* and others after.
ROLE_ORDER = ("teacher", "baseline", "deit-soft", "deit-hard")


class ReportError(ValueError):
    """Nothing to report on (no experiment, no finished stage run, no loadable model)."""


def _what_to_run_first(experiment: str, uri: str) -> str:
    return (f"train something first with the same tracking store and experiment, e.g. "
            f"`python -m pipeline run --config configs/demo.yaml tracking.experiment={experiment} tracking.uri={uri}` "
            f"(or the teacher / distill stages)")


def find_experiment_id(client, experiment: str, uri: str) -> str:
    """The id of the named MLflow experiment; ReportError when it is missing or the store unreadable."""
    try:
        exp = client.get_experiment_by_name(experiment)
    except Exception as exc:
        raise ReportError(f"cannot read the MLflow store at {uri}: {type(exc).__name__}: {str(exc)[:200]}") from None
    if exp is None:
        raise ReportError(f"MLflow experiment {experiment!r} does not exist at {uri}; {_what_to_run_first(experiment, uri)}")
    return exp.experiment_id


def _finished_runs(client, experiment_id: str) -> list:
    runs, token = [], None
    while True:
        page = client.search_runs([experiment_id], filter_string="attributes.status = 'FINISHED'", max_results=1000, page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def is_sweep_trial(run) -> bool:
    """Whether the run is one trial of a sweep rather than a published stage run."""
    tags = run.data.tags
    return "trial_id" in tags or "sweep" in tags or tags.get("pipeline.invocation") == "trial"


def _ended(run) -> tuple[int, int]:
    # A resumed stage run keeps its first start time, so "latest" means the one that ended last.
    return (run.info.end_time or 0, run.info.start_time or 0)


def select_runs(runs: list) -> dict[str, Any]:
    """The run that represents each role: see the ``pipeline.report`` docstring for the rule."""
    by_role: dict[str, list] = {}
    for run in runs:
        tags = run.data.tags
        if run.info.status == "FINISHED" and tags.get("role") and tags.get("stage") in STAGES:
            by_role.setdefault(tags["role"], []).append(run)
    chosen = {}
    for role, candidates in by_role.items():
        published = [r for r in candidates if not is_sweep_trial(r)]
        if published:
            chosen[role] = max(published, key=_ended)
        else:
            chosen[role] = max(candidates, key=lambda r: (r.data.tags.get("best_trial") == "true", *_ended(r)))
    return dict(sorted(chosen.items(), key=lambda kv: role_sort_key(kv[0])))


def role_sort_key(role: str) -> tuple[int, str]:
    """Fixed roles in ROLE_ORDER first, then the others by name."""
    return (ROLE_ORDER.index(role), "") if role in ROLE_ORDER else (len(ROLE_ORDER), role)

