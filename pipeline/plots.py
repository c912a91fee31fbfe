"""PNG plots logged with every training stage: learning curves and a confusion matrix."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def learning_curves(history: list[dict[str, float]], path: str, title: str) -> str:
    epochs = [h["epoch"] for h in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    for key in ("train_loss", "val_loss"):
        if all(key in h for h in history):
            ax_loss.plot(epochs, [h[key] for h in history], marker="o", label=key)
    for key in ("train_acc", "val_acc", "val_acc_cls", "val_acc_dist", "val_teacher_acc", "val_agreement"):
        if all(key in h for h in history):
            ax_acc.plot(epochs, [h[key] for h in history], marker="o", label=key)
    ax_loss.set_xlabel("epoch"), ax_loss.set_title("loss"), ax_loss.legend()
    ax_acc.set_xlabel("epoch"), ax_acc.set_title("accuracy"), ax_acc.set_ylim(0, 1.02), ax_acc.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def confusion_matrix(confusion: list[list[int]], class_names: list[str], path: str, title: str) -> str:
    k = len(class_names)
    fig, ax = plt.subplots(figsize=(1.0 + 0.6 * k, 1.0 + 0.6 * k))
    ax.imshow(confusion, cmap="Blues")
    ax.set_xticks(range(k), class_names, rotation=45, ha="right")
    ax.set_yticks(range(k), class_names)
    ax.set_xlabel("predicted"), ax.set_ylabel("true"), ax.set_title(title)
    if k <= 20:
        for i in range(k):
            for j in range(k):
                ax.text(j, i, str(int(confusion[i][j])), ha="center", va="center", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


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
