"""PNG plots: learning curves and a confusion matrix for every training stage, metric against
swept keys for a sweep, and the comparison report's two plots."""

from __future__ import annotations

from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _save(fig, path: str) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def learning_curves(history: list[dict[str, float]], path: str, title: str) -> str:
    """Loss and accuracy per epoch, titled with the model; the best epoch (by val_top1) marked."""
    return _save(learning_curves_figure(history, title), path)


def learning_curves_figure(history: list[dict[str, float]], title: str):
    from matplotlib.ticker import MaxNLocator

    epochs = [h["epoch"] for h in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    for key in ("train_loss", "val_loss"):
        if all(key in h for h in history):
            ax_loss.plot(epochs, [h[key] for h in history], marker="o", label=key)
    for key in ("train_top1", "val_top1", "val_top1_cls", "val_top1_dist", "val_teacher_top1", "val_agreement"):
        if all(key in h for h in history):
            ax_acc.plot(epochs, [h[key] for h in history], marker="o", label=key)
    scored = [h for h in history if h.get("val_top1") is not None]
    if scored:
        best = max(scored, key=lambda h: h["val_top1"])
        for ax in (ax_loss, ax_acc):
            ax.axvline(best["epoch"], color="grey", linestyle="--", linewidth=1)
        ax_acc.annotate(f"best: epoch {best['epoch']}, val_top1 {best['val_top1']:.3f}", (best["epoch"], best["val_top1"]),
                        textcoords="offset points", xytext=(-10, -16), ha="right", fontsize=8)
    for ax in (ax_loss, ax_acc):
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole numbers
    ax_loss.set_title("loss"), ax_loss.legend()
    ax_acc.set_title("accuracy"), ax_acc.set_ylim(0, 1.02), ax_acc.legend(loc="lower right", fontsize=8)
    fig.suptitle(title)
    return fig


def confusion_matrix(confusion: list[list[int]], class_names: list[str], path: str, title: str, normalize: bool = False) -> str:
    """Rows are the true class. ``normalize``: each row as fractions of that class (recall on the
    diagonal), which reads better when classes differ in size. The title gives the accuracy."""
    return _save(confusion_figure(confusion, class_names, title, normalize), path)


def confusion_figure(confusion: list[list[int]], class_names: list[str], title: str, normalize: bool = False):
    import numpy as np

    counts = np.asarray(confusion, dtype=float)
    k = len(class_names)
    total = counts.sum()
    accuracy = np.trace(counts) / total if total else 0.0
    shown = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1) if normalize else counts
    fig, ax = plt.subplots(figsize=(2.2 + 0.7 * k, 1.4 + 0.65 * k))
    image = ax.imshow(shown, cmap="Blues", vmin=0, vmax=1 if normalize else max(shown.max(), 1))
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="fraction of the true class" if normalize else "images")
    ax.set_xticks(range(k), class_names, rotation=45, ha="right")
    ax.set_yticks(range(k), class_names)
    ax.set_xlabel("predicted"), ax.set_ylabel("true")
    ax.set_title(f"{title}\naccuracy {accuracy:.1%} of {int(total)} images", fontsize=10)
    if k <= 20:
        threshold = image.norm.vmax / 2
        for i in range(k):
            for j in range(k):
                text = f"{shown[i, j]:.2f}" if normalize else str(int(counts[i, j]))
                # White on dark cells, black on light ones: readable on the whole colour scale.
                ax.text(j, i, text, ha="center", va="center", fontsize=8, color="white" if shown[i, j] > threshold else "black")
    return fig


def sweep_scatter(rows: list[dict], keys: list[str], metric: str, path: str) -> str:
    """The metric of every trial against each swept key, one panel per key."""
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.5), squeeze=False)
    for ax, key in zip(axes[0], keys):
        xs = [r[key] for r in rows]
        ys = [r[metric] for r in rows]
        colours = ["tab:red" if r.get("stopped_early") else "tab:blue" for r in rows]
        ax.scatter(xs, ys, c=colours)
        if all(isinstance(x, (int, float)) and x > 0 for x in xs) and max(xs) / max(min(xs), 1e-12) > 20:
            ax.set_xscale("log")
        ax.set_xlabel(key)
        ax.set_ylabel(metric)
    fig.suptitle(f"{metric} per trial (red: stopped early by ASHA)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_accuracy_vs_latency(rows: list[dict[str, Any]], path: str) -> str:
    """Val top-1 against ms per image, one point per role, area ~ parameters. Colour: the student (a
    role without its ``-alone`` / ``-distilled`` suffix); star: the teacher; triangle: a
    ``*-distilled`` student, with an arrow from its ``*-alone`` twin.

    A legend names the points: labels written beside them collided once a report held a few models
    of one architecture (and labels staggered to avoid that drifted away from their points)."""
    fig = accuracy_vs_latency_figure(rows)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def accuracy_vs_latency_figure(rows: list[dict[str, Any]]):
    """The figure :func:`plot_accuracy_vs_latency` saves (the caller closes it)."""
    from matplotlib.lines import Line2D

    fig, ax = plt.subplots(figsize=(10, 4.8))
    biggest = max(r["params"] for r in rows) or 1

    def student(role: str) -> str:
        return role.removesuffix("-alone").removesuffix("-distilled")

    students = list(dict.fromkeys(student(r["role"]) for r in rows))
    colour = {s: plt.get_cmap("tab10")(i % 10) for i, s in enumerate(students)}

    def area(r: dict[str, Any]) -> float:
        return 60 + 400 * r["params"] / biggest

    handles = []
    for r in rows:
        marker = "*" if r["role"] == "teacher" else "^" if r["role"].endswith("-distilled") else "o"
        ax.scatter(r["latency_ms"], r["val_top1"], s=area(r), marker=marker, alpha=0.75,
                   color=colour[student(r["role"])], edgecolors="black", linewidths=0.5)
        handles.append(Line2D([], [], linestyle="none", marker=marker, markersize=8, color=colour[student(r["role"])],
                              markeredgecolor="black", label=f"{r['role']} ({r['arch']}): {100 * r['val_top1']:.1f} %"))
    latencies = [r["latency_ms"] for r in rows]
    if max(latencies) / max(min(latencies), 1e-9) > 20:
        ax.set_xscale("log")
    if ax.get_xscale() == "log":
        ax.set_xlim(right=max(latencies) * 3)
    else:
        ax.set_xlim(0, max(latencies) * 1.15)  # from zero: distances then read as ratios
    ax.set_xlabel("CPU latency, ms / image (batch 1)")
    ax.set_ylabel("val top-1")
    ax.set_ylim(0, 1.05)
    ax.grid(alpha=0.3)
    ax.legend(handles=handles, loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8, frameon=False)
    ax.set_title("accuracy vs latency (marker area ~ parameters; arrow: alone -> distilled)")
    fig.tight_layout()
    # Arrows last, once the layout is fixed: an arrow is drawn from edge to edge of its two markers
    # (radius in points: half the square root of the area) and only where they do not overlap; a
    # shorter one would show a stray head beside the markers, pointing anywhere.
    by_role = {r["role"]: r for r in rows}
    to_points = 72 / fig.dpi
    for r in rows:
        alone = by_role.get(student(r["role"]) + "-alone") if r["role"].endswith("-distilled") else None
        if alone is None:
            continue
        gap_a, gap_b = area(alone) ** 0.5 / 2 + 1, area(r) ** 0.5 / 2 + 1
        (xa, ya), (xb, yb) = ax.transData.transform([(alone["latency_ms"], alone["val_top1"]), (r["latency_ms"], r["val_top1"])])
        if ((xb - xa) ** 2 + (yb - ya) ** 2) ** 0.5 * to_points > gap_a + gap_b + 4:
            ax.annotate("", xy=(r["latency_ms"], r["val_top1"]), xytext=(alone["latency_ms"], alone["val_top1"]),
                        arrowprops={"arrowstyle": "-|>", "color": "0.2", "lw": 1.2, "shrinkA": gap_a, "shrinkB": gap_b},
                        zorder=3)
    return fig


def plot_accuracy_agreement(rows: list[dict[str, Any]], path: str) -> str:
    """Grouped bars per role: val top-1 and agreement with the teacher (absent for the teacher)."""
    fig, ax = plt.subplots(figsize=(1.6 + 1.3 * len(rows), 4))
    xs = range(len(rows))
    width = 0.38
    bars = ax.bar([x - width / 2 for x in xs], [r["val_top1"] for r in rows], width, label="val top-1")
    ax.bar_label(bars, fmt="%.2f", fontsize=8)
    agree = [(x, r["val_agreement"]) for x, r in zip(xs, rows) if r["val_agreement"] is not None]
    if agree:
        bars = ax.bar([x + width / 2 for x, _ in agree], [a for _, a in agree], width, label="agreement with teacher")
        ax.bar_label(bars, fmt="%.2f", fontsize=8)  # makes an agreement of 0 visible too
    ax.set_xticks(list(xs), [r["role"] for r in rows], rotation=20, ha="right")
    ax.set_ylim(0, 1.25)
    ax.legend(loc="upper right", ncol=2, fontsize=8)
    ax.set_title("validation top-1 and agreement with the teacher")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
