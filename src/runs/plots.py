"""PNG figures: a run's learning curves, several runs overlaid (or their seeds' mean and spread), a confusion
matrix, a reliability diagram.

Uses matplotlib's object API with the Agg renderer (no pyplot, no display, no global state), and
writes each file atomically, so a figure being redrawn is never seen half written.
"""
import io

from src.files import atomic_write

TRAIN_STYLE = {"linestyle": "-", "marker": "o", "markersize": 3}
VALID_STYLE = {"linestyle": "--", "marker": "s", "markersize": 3}


def _figure(width, height, layout="constrained"):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100, layout=layout)


def _save(figure, path):
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    atomic_write(path, lambda f: f.write(buffer.getvalue()))


def plot_curves(log, path, title):
    """Loss and accuracy against epoch, training and validation, for one run's log. Its margins are fixed: it is
    redrawn during training, and the constrained layout's solver took half of each drawing (0.35-0.48 s against
    0.18-0.22 s on a 2-core AVX2 EPYC, 3 December 2026)."""
    figure = _figure(10, 4, layout=None)
    figure.subplots_adjust(left=0.07, right=0.98, bottom=0.12, top=0.85, wspace=0.25)
    figure.suptitle(title)
    loss_axes, acc_axes = figure.subplots(1, 2)
    for axes, metric, label in ((loss_axes, "loss", "cross-entropy loss"), (acc_axes, "acc", "accuracy")):
        axes.plot(log["epoch"], log[f"train_{metric}"], label="training", **TRAIN_STYLE)
        valid = log[f"valid_{metric}"].notna()  # epochs not validated (valid_every > 1) are skipped, not gaps
        if valid.any():
            axes.plot(log["epoch"][valid], log[f"valid_{metric}"][valid], label="validation", **VALID_STYLE)
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
        valid = log.dropna(subset=["valid_acc"])  # epochs not validated (valid_every > 1): skipped, not gaps
        line = acc_axes.plot(valid["epoch"], valid["valid_acc"], label=name, **TRAIN_STYLE)[0]
        loss_axes.plot(valid["epoch"], valid["valid_loss"], color=line.get_color(), **TRAIN_STYLE)
        loss_axes.plot(log["epoch"], log["train_loss"], color=line.get_color(), alpha=0.5, **VALID_STYLE)
    acc_axes.set(title="Validation accuracy", xlabel="epoch", ylabel="accuracy")
    loss_axes.set(title="Loss (solid: validation, dashed: training)", xlabel="epoch", ylabel="cross-entropy loss")
    for axes in (acc_axes, loss_axes):
        axes.grid(alpha=0.3)
    figure.legend(loc="outside lower center", ncol=min(len(logs), 2), fontsize="small")
    _save(figure, path)


def plot_groups(groups, path, title="Configurations compared"):
    """Per configuration, the mean over its runs (seeds) of validation accuracy and loss against epoch, with a
    band of ±1 standard deviation; `groups`: {label: [log DataFrame, ...]}. An epoch's mean and spread are
    over the runs that reached it."""
    import pandas as pd
    from matplotlib.ticker import MaxNLocator

    figure = _figure(11, 4.5 + 0.25 * ((len(groups) + 1) // 2))
    figure.suptitle(title)
    acc_axes, loss_axes = figure.subplots(1, 2)
    for label, logs in groups.items():
        logs = [log.reindex(columns=["epoch", "valid_acc", "valid_loss", "train_loss"]) for log in logs if len(log)]
        if not logs:
            continue
        by_epoch = pd.concat(logs).astype(float).groupby("epoch")
        mean, std = by_epoch.mean(), by_epoch.std(ddof=1).fillna(0.0)  # one run: no band
        train_loss = mean["train_loss"]
        mean, std = mean[mean["valid_acc"].notna()], std[mean["valid_acc"].notna()]  # epochs not validated
        line = acc_axes.plot(mean.index, mean["valid_acc"], label=label, **TRAIN_STYLE)[0]
        color = line.get_color()
        acc_axes.fill_between(mean.index, mean["valid_acc"] - std["valid_acc"], mean["valid_acc"] + std["valid_acc"],
                              color=color, alpha=0.2, linewidth=0)
        loss_axes.plot(mean.index, mean["valid_loss"], color=color, **TRAIN_STYLE)
        loss_axes.fill_between(mean.index, mean["valid_loss"] - std["valid_loss"],
                               mean["valid_loss"] + std["valid_loss"], color=color, alpha=0.2, linewidth=0)
        loss_axes.plot(train_loss.index, train_loss, color=color, alpha=0.5, **VALID_STYLE)
    acc_axes.set(title="Validation accuracy (mean ± 1 std)", xlabel="epoch", ylabel="accuracy")
    loss_axes.set(title="Loss (solid: validation ± 1 std, dashed: training)", xlabel="epoch",
                  ylabel="cross-entropy loss")
    for axes in (acc_axes, loss_axes):
        axes.grid(alpha=0.3)
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs
    figure.legend(loc="outside lower center", ncol=min(len(groups), 2), fontsize="small")
    _save(figure, path)


def plot_reliability(bins, path, title):
    """A reliability diagram: per confidence bin, the accuracy (bars) against the confidence (the diagonal is
    perfect calibration; red: the gap), and below, how many images fall in each bin. `bins`: the
    `reliability` list of src.evaluation.calibration."""
    import numpy as np

    lower = np.array([b["lower"] for b in bins])
    width = np.array([b["upper"] - b["lower"] for b in bins])
    count = np.array([b["count"] for b in bins])
    accuracy = np.array([np.nan if b["accuracy"] is None else b["accuracy"] for b in bins])
    confidence = np.array([np.nan if b["confidence"] is None else b["confidence"] for b in bins])
    figure = _figure(5.5, 6.5)
    figure.suptitle(title)
    top, bottom = figure.subplots(2, 1, sharex=True, height_ratios=[3, 1])
    top.bar(lower, np.nan_to_num(accuracy), width=width, align="edge", color="tab:blue", edgecolor="black",
            linewidth=0.5, label="accuracy")
    gap = np.nan_to_num(confidence - accuracy)
    top.bar(lower, gap, bottom=np.nan_to_num(accuracy), width=width, align="edge", fill=False, hatch="///",
            edgecolor="tab:red", linewidth=0.8, label="gap to the bin's mean confidence")
    top.plot([0, 1], [0, 1], "k--", linewidth=1, label="perfect calibration")
    top.set(ylabel="accuracy", xlim=(0, 1), ylim=(0, 1))
    top.legend(loc="upper left", fontsize="small")
    top.grid(alpha=0.3)
    bottom.bar(lower, count, width=width, align="edge", color="gray", edgecolor="black", linewidth=0.5)
    bottom.set(xlabel="confidence (the top class's probability)", ylabel="images")
    bottom.grid(alpha=0.3)
    _save(figure, path)


def plot_confusion(matrix, class_names, path, title):
    """Rows: true class, columns: predicted class; each row as a fraction of that class's images."""
    import numpy as np

    totals = matrix.sum(axis=1, keepdims=True)
    fractions = matrix / np.maximum(totals, 1)
    size = 5 + 0.25 * min(len(class_names), 20) + 0.1 * max(len(class_names) - 20, 0)  # 100 classes: 15 inches
    figure = _figure(size + 1, size)
    axes = figure.subplots()
    image = axes.imshow(fractions, cmap="Blues", vmin=0, vmax=1)
    figure.colorbar(image, ax=axes, label="fraction of the true class")
    axes.set(title=title, xlabel="predicted class", ylabel="true class")
    ticks = range(len(class_names))
    small = {"fontsize": 5} if len(class_names) > 20 else {}  # CIFAR-100: every name, small
    axes.set_xticks(ticks, class_names, rotation=45 if not small else 90, ha="right" if not small else "center",
                    **small)
    axes.set_yticks(ticks, class_names, **small)
    if len(class_names) <= 20:
        for i in ticks:
            for j in ticks:
                if matrix[i, j]:
                    axes.text(j, i, str(matrix[i, j]), ha="center", va="center", fontsize=7,
                              color="white" if fractions[i, j] > 0.5 else "black")
    _save(figure, path)


STATE_STYLE = {"complete": {"marker": "o", "color": "tab:blue"}, "pruned": {"marker": "x", "color": "tab:orange"},
               "running": {"marker": "^", "color": "tab:green"}}


def plot_search_history(table, metric, maximize, path, title):
    """A search's metric per trial (complete, pruned at its last rung's value, running), and the best so far
    among complete trials; `table`: a row per trial with `trial`, `state`, `epochs` and the metric."""
    from matplotlib.ticker import MaxNLocator

    figure = _figure(8, 4.5)
    axes = figure.subplots()
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    for state, style in STATE_STYLE.items():
        rows = table[(table["state"] == state) & table[metric].notna()]
        if len(rows):
            axes.scatter(rows["trial"], rows[metric], label=f"{state} ({len(rows)})", **style)
    done = table[table["state"] == "complete"].sort_values("trial")
    if len(done):
        best = done[metric].cummax() if maximize else done[metric].cummin()
        axes.step(done["trial"], best, where="post", color="tab:red", label="best so far")
    axes.set(title=title, xlabel="trial", ylabel=f"{metric} (pruned: at the epoch it stopped)")
    axes.grid(alpha=0.3)
    axes.legend(fontsize="small")
    _save(figure, path)


def plot_search_params(table, metric, dimensions, path, title):
    """The metric against each searched key, one panel per key (log axis for a log range, the choices in
    order for a choice); `dimensions`: (key, kind, log, choices) per key."""
    panels = len(dimensions)
    columns = min(panels, 3)
    figure = _figure(4 * columns, 3.4 * ((panels + columns - 1) // columns) + 0.4)
    figure.suptitle(title)
    axes_list = figure.subplots((panels + columns - 1) // columns, columns, squeeze=False).ravel()
    for axes, (key, kind, log, choices) in zip(axes_list, dimensions, strict=False):
        for state, style in STATE_STYLE.items():
            rows = table[(table["state"] == state) & table[metric].notna()]
            if not len(rows):
                continue
            x = [choices.index(value) for value in rows[key]] if kind == "choice" else rows[key]
            axes.scatter(x, rows[metric], label=state, alpha=0.8, **style)
        if kind == "choice":
            axes.set_xticks(range(len(choices)), choices)
            axes.set_xlim(-0.5, len(choices) - 0.5)
        elif log:
            from matplotlib.ticker import NullFormatter

            axes.set_xscale("log")
            axes.xaxis.set_minor_formatter(NullFormatter())  # 2x10^-2, 3x10^-2... overlap on a narrow panel
        axes.set(xlabel=key, ylabel=metric)
        axes.grid(alpha=0.3)
    for axes in axes_list[panels:]:
        axes.set_visible(False)
    axes_list[0].legend(fontsize="small")
    _save(figure, path)
