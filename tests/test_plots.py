"""The plots a stage logs read at a glance: contrasting digits, a colour bar and the accuracy on the
confusion matrix; the model, the best epoch and whole-number epochs on the learning curves; every
model named, and each distillation's gain drawn, on the report's accuracy-vs-latency plot."""

import matplotlib.pyplot as plt
import pytest

from pipeline import plots

CONFUSION = [[40, 2, 0], [5, 30, 5], [0, 0, 18]]  # 88 of 100 right
NAMES = ["daisy", "rose", "tulip"]


def _cell_texts(ax):
    return {t.get_text(): t.get_color() for t in ax.texts}


def test_confusion_matrix_has_contrasting_text_a_colour_bar_and_the_accuracy():
    fig = plots.confusion_figure(CONFUSION, NAMES, "student deit_tiny")
    ax, colourbar = fig.axes
    assert "accuracy 88.0% of 100 images" in ax.get_title() and "student deit_tiny" in ax.get_title()
    assert colourbar.get_ylabel() == "images"
    texts = _cell_texts(ax)
    assert texts["40"] == "white" and texts["30"] == "white"  # the dark diagonal
    assert texts["2"] == "black" and texts["0"] == "black"  # the light cells
    plt.close(fig)


def test_row_normalised_confusion_shows_each_class_recall():
    fig = plots.confusion_figure(CONFUSION, NAMES, "x", normalize=True)
    ax = fig.axes[0]
    texts = [t.get_text() for t in ax.texts]
    assert texts[0] == f"{40 / 42:.2f}" and texts[4] == f"{30 / 40:.2f}" and texts[8] == "1.00"
    assert "accuracy 88.0%" in ax.get_title()  # the overall accuracy is still the counts'
    plt.close(fig)


def test_learning_curves_mark_the_best_epoch_with_integer_ticks():
    history = [{"epoch": e, "train_loss": 1.0 / e, "val_loss": 1.1 / e, "train_top1": 0.2 * e, "val_top1": acc}
               for e, acc in zip(range(1, 5), [0.4, 0.7, 0.65, 0.6])]
    fig = plots.learning_curves_figure(history, "baseline resnet10t")
    ax_loss, ax_acc = fig.axes
    assert fig._suptitle.get_text() == "baseline resnet10t"
    marker_x = {float(line.get_xdata()[0]) for ax in (ax_loss, ax_acc) for line in ax.lines if line.get_linestyle() == "--"}
    assert marker_x == {2.0}
    assert any("best: epoch 2" in t.get_text() for t in ax_acc.texts)
    fig.canvas.draw()
    ticks = [t for t in ax_acc.get_xticks() if 1 <= t <= 4]
    assert ticks and all(float(t).is_integer() for t in ticks)
    plt.close(fig)


@pytest.mark.parametrize("normalize", [False, True])
def test_confusion_png_is_written(tmp_path, normalize):
    path = plots.confusion_matrix(CONFUSION, NAMES, str(tmp_path / "c.png"), "t", normalize=normalize)
    assert open(path, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_accuracy_vs_latency_names_every_model_in_a_legend_and_draws_each_pairs_gain():
    rows = [{"role": "teacher", "arch": "lite2", "latency_ms": 30.0, "val_top1": 0.97, "params": 4.8e6}]
    for student, alone, distilled in (("a", 0.60, 0.93), ("b", 0.79, 0.78)):
        rows += [{"role": f"{student}-alone", "arch": "same", "latency_ms": 10.0, "val_top1": alone, "params": 3e6},
                 {"role": f"{student}-distilled", "arch": "same", "latency_ms": 10.5, "val_top1": distilled, "params": 3e6}]
    rows.append({"role": "baseline", "arch": "other", "latency_ms": 12.0, "val_top1": 0.5, "params": 5e6})
    fig = plots.accuracy_vs_latency_figure(rows)
    ax = fig.axes[0]
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels[0] == "teacher (lite2): 97.0 %" and "a-distilled (same): 93.0 %" in labels and len(labels) == len(rows)
    # an arrow from alone to distilled where the two markers lie apart (not for b's one point)
    arrows = [c for c in ax.get_children() if getattr(c, "arrow_patch", None) is not None]
    assert [(a.xy, a.xyann) for a in arrows] == [((10.5, 0.93), (10.0, 0.60))]
    # two students of one architecture get different colours, each pair one
    colour = {h.get_label().split(" ")[0]: h.get_color() for h in ax.get_legend().legend_handles}
    assert colour["a-alone"] == colour["a-distilled"] != colour["b-alone"] == colour["b-distilled"]
    plt.close(fig)
