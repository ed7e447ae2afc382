"""PNG figures: a run's learning curves, several runs overlaid, a confusion matrix.

Uses matplotlib's object API with the Agg renderer (no pyplot, no display, no global state), and
writes each file atomically, so a figure being redrawn is never seen half written.
"""
import io

from src.files import atomic_write

TRAIN_STYLE = {"linestyle": "-", "marker": "o", "markersize": 3}
VALID_STYLE = {"linestyle": "--", "marker": "s", "markersize": 3}


def _figure(width, height):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def _save(figure, path):
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    atomic_write(path, lambda f: f.write(buffer.getvalue()))


def plot_curves(log, path, title):
    """Loss and accuracy against epoch, training and validation, for one run's log."""
    figure = _figure(10, 4)
    figure.suptitle(title)
    loss_axes, acc_axes = figure.subplots(1, 2)
    for axes, metric, label in ((loss_axes, "loss", "cross-entropy loss"), (acc_axes, "acc", "accuracy")):
        axes.plot(log["epoch"], log[f"train_{metric}"], label="training", **TRAIN_STYLE)
        if log[f"valid_{metric}"].notna().any():
            axes.plot(log["epoch"], log[f"valid_{metric}"], label="validation", **VALID_STYLE)
        axes.set_xlabel("epoch")
        axes.set_ylabel(label)
        axes.set_title(label.capitalize())
        axes.grid(alpha=0.3)
        axes.legend()
    _save(figure, path)


def plot_runs(logs, path, title="Runs compared"):
    """Validation accuracy and loss against epoch, one line per run; `logs`: {run name: log DataFrame}."""
    figure = _figure(11, 4.5 + 0.25 * ((len(logs) + 1) // 2))
    figure.suptitle(title)
    acc_axes, loss_axes = figure.subplots(1, 2)
    for name, log in logs.items():
        log = log.reindex(columns=["epoch", "valid_acc", "valid_loss", "train_loss"])  # a column missing: a gap
        if not len(log):
            continue
        line = acc_axes.plot(log["epoch"], log["valid_acc"], label=name, **TRAIN_STYLE)[0]
        loss_axes.plot(log["epoch"], log["valid_loss"], color=line.get_color(), **TRAIN_STYLE)
        loss_axes.plot(log["epoch"], log["train_loss"], color=line.get_color(), alpha=0.5, **VALID_STYLE)
    acc_axes.set(title="Validation accuracy", xlabel="epoch", ylabel="accuracy")
    loss_axes.set(title="Loss (solid: validation, dashed: training)", xlabel="epoch", ylabel="cross-entropy loss")
    for axes in (acc_axes, loss_axes):
        axes.grid(alpha=0.3)
    figure.legend(loc="outside lower center", ncol=min(len(logs), 2), fontsize="small")
    _save(figure, path)


def plot_confusion(matrix, class_names, path, title):
    """Rows: true class, columns: predicted class; each row as a fraction of that class's images."""
    import numpy as np

    totals = matrix.sum(axis=1, keepdims=True)
    fractions = matrix / np.maximum(totals, 1)
    size = 5 + 0.25 * min(len(class_names), 20)
    figure = _figure(size + 1, size)
    axes = figure.subplots()
    image = axes.imshow(fractions, cmap="Blues", vmin=0, vmax=1)
    figure.colorbar(image, ax=axes, label="fraction of the true class")
    axes.set(title=title, xlabel="predicted class", ylabel="true class")
    if len(class_names) <= 20:
        ticks = range(len(class_names))
        axes.set_xticks(ticks, class_names, rotation=45, ha="right")
        axes.set_yticks(ticks, class_names)
        for i in ticks:
            for j in ticks:
                if matrix[i, j]:
                    axes.text(j, i, str(matrix[i, j]), ha="center", va="center", fontsize=7,
                              color="white" if fractions[i, j] > 0.5 else "black")
    _save(figure, path)
