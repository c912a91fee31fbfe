"""Writing the report: the table as Markdown and CSV (same cells), and everything as JSON."""

from __future__ import annotations

import csv
import json
from typing import Any

from pipeline.report.measure import THROUGHPUT_BATCH, WARMUP_RUNS

# (row key, Markdown header): report.md and report.csv hold the same cells; the CSV uses the keys as header.
COLUMNS = (
    ("role", "role"),
    ("arch", "model"),
    ("val_top1", "val top-1"),
    ("val_top1_recorded", "val top-1 (recorded)"),
    ("params_m", "params (M)"),
    ("size_mb", "size (MB)"),
    ("latency_ms", "latency ms/img @bs1"),
    ("images_per_s", f"img/s @bs{THROUGHPUT_BATCH}"),
    ("val_agreement", "agreement with teacher"),
    ("run_id", "run id"),
)
_DECIMALS = {"val_top1": 4, "val_top1_recorded": 4, "params_m": 3, "size_mb": 3, "latency_ms": 3, "images_per_s": 1,
             "val_agreement": 4}
MISSING_MD = "—"  # a value that does not exist (the teacher's agreement); an empty cell in the CSV


def cell(row: dict[str, Any], key: str) -> str:
    """The text of one table cell (shared by the Markdown and the CSV); '' for a missing value."""
    value = row.get(key)
    if value is None:
        return ""
    if key in _DECIMALS:
        return f"{float(value):.{_DECIMALS[key]}f}"
    return str(value)


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """The rows as a Markdown table, one column per COLUMNS entry."""
    lines = ["| " + " | ".join(h for _, h in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for row in rows:
        lines.append("| " + " | ".join(cell(row, k) or MISSING_MD for k, _ in COLUMNS) + " |")
    return "\n".join(lines) + "\n"


def write_markdown(path: str, rows: list[dict[str, Any]], settings: dict[str, Any], skipped: list[dict[str, str]]) -> str:
    """report.md: how it was measured, the table, and a note per caveat or left-out run."""
    parts = [f"# Model comparison: experiment `{settings['experiment']}`\n",
             f"CPU, {settings['threads']} torch thread(s), torch {settings['torch']}, {settings['machine']} "
             f"({settings['cpus']} CPUs, load average {settings['load_average_1m']} at start); "
             f"latency: median of {settings['latency_runs']} single-image runs after {WARMUP_RUNS} warm-up; "
             f"throughput: median of {settings['throughput_runs']} batches of {THROUGHPUT_BATCH}. "
             f"Val top-1 recomputed on each run's validation split; agreement = share of validation images "
             f"on which the model's top class equals the teacher's.\n",
             markdown_table(rows)]
    notes = [f"- **{r['role']}**: {n}" for r in rows for n in r["notes"]]
    notes += [f"- **{s['role']}** (run {s['run_id']}) left out: {s['reason']}" for s in skipped]
    if notes:
        parts.append("Notes:\n\n" + "\n".join(notes) + "\n")
    with open(path, "w") as f:
        f.write("\n".join(parts))
    return path


def write_csv(path: str, rows: list[dict[str, Any]]) -> str:
    """report.csv: the Markdown table's cells, with the row keys as header."""
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow([k for k, _ in COLUMNS])
        for row in rows:
            w.writerow([cell(row, k) for k, _ in COLUMNS])
    return path


def write_json(path: str, report: dict[str, Any]) -> str:
    """``report`` as indented JSON (report.json); values JSON cannot hold are written as strings."""
    with open(path, "w") as f:
        json.dump(report, f, indent=2, default=str)
    return path

