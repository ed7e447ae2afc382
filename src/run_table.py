"""The run table that report.py prints and a sweep ends with: one row per run, the config keys that
differ between the runs, and where each run is and how well it does. From `src.analysis.load_runs`.
"""
import json
import numbers

from src.analysis import RUN_METRICS

METRICS = ["epochs", "state", "best_valid_acc", "last_valid_acc", "training_hours"]


def differing_keys(table, config_keys):
    """Config keys with more than one value among the runs (lists and dicts compared as JSON)."""
    return [key for key in config_keys if table[key].map(lambda v: json.dumps(v, sort_keys=True)).nunique() > 1]


def build_table(runs):
    """The report's columns, from `load_runs`' DataFrame."""
    config_keys = [c for c in runs.columns if c not in ("run", *RUN_METRICS)]
    table = runs[["run"] + differing_keys(runs, config_keys)].copy()
    totals = runs["n_epochs"] if "n_epochs" in runs else [None] * len(runs)  # a config may lack it
    table["epochs"] = [f"{done}/{format_cell(total, False)}" for done, total in zip(runs["epochs_done"], totals,
                                                                                   strict=True)]
    for column in METRICS[1:]:
        table[column] = runs[column]
    return table


def is_missing(value):
    return value is None or (isinstance(value, float) and value != value)  # None or NaN


def sort_key(value):
    """Numbers in order, then everything else by its text; a column can hold both when configs differ in type."""
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return (0, value, "")
    return (1, 0, str(value))


def sort_table(table, column, reverse=False, values=None):
    """Rows ordered by `column` (or by `values`, one per row), ascending or not; missing values always last."""
    values = list(table[column] if values is None else values)
    present = [i for i, v in enumerate(values) if not is_missing(v)]
    present.sort(key=lambda i: sort_key(values[i]), reverse=reverse)  # stable, also reversed
    return table.iloc[present + [i for i, v in enumerate(values) if is_missing(v)]]


def format_cell(value, metric):
    """Metrics with 4 decimals; config values in as few digits as tell them apart (1e-05, 0.05, 32)."""
    if is_missing(value):
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}" if metric else f"{value:.6g}"
    return str(value)


def rows_of(table):
    metric = [column in METRICS for column in table.columns]
    return [[format_cell(v, m) for v, m in zip(row, metric, strict=True)] for row in table.itertuples(index=False)]


def as_text(table):
    cells = [[str(c) for c in table.columns]] + rows_of(table)
    widths = [max(len(row[i]) for row in cells) for i in range(len(cells[0]))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() for row in cells]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines) + "\n"


def as_markdown(table):
    rows = [[str(c) for c in table.columns]] + rows_of(table)
    lines = ["| " + " | ".join(row) + " |" for row in rows]
    lines.insert(1, "|" + "---|" * len(table.columns))
    return "\n".join(lines) + "\n"
