"""The run table that report.py prints and a sweep ends with: one row per run, the config keys that
differ between the runs, the model's size, its test results when evaluate.py saved them, and where each
run is and how well it does. From `src.analysis.load_runs`; `grouped_table` makes the table of seeds
aggregated from `src.analysis.group_seeds`.
"""
import json
import numbers

from src.analysis.runs import RUN_METRICS, is_test_metric
from src.analysis.seeds import GROUP_COUNTS, GROUPED_METRICS, group_seeds
from src.networks.size import format_macs

METRICS = ["epochs", "state", "best_valid_acc", "last_valid_acc", "training_hours"]
# The test results shown, when any run has them: the model chosen by validation (`best`, the EMA's when `ema`
# was on) on the test set and the shift sets. load_runs and the grouped CSV have every number saved.
TEST_COLUMNS = ["best_test_acc", "best_test_top5", "best_test_ece", "best_cifar10.1_acc", "best_cifar10c_acc"]
SIZE = {"parameters": "parameters", "macs_per_image": "MACs"}  # load_runs' column -> the table's


def differing_keys(table, config_keys):
    """Config keys with more than one value among the runs (lists and dicts compared as JSON)."""
    return [key for key in config_keys if table[key].map(lambda v: json.dumps(_json(v), sort_keys=True)).nunique() > 1]


def _json(value):
    return None if isinstance(value, float) and value != value else value  # NaN: a key that run's config lacks


def build_table(runs):
    """The report's columns, from `load_runs`' DataFrame."""
    config_keys = [c for c in runs.columns if c not in ("run", *RUN_METRICS) and not is_test_metric(c)]
    table = runs[["run"] + differing_keys(runs, config_keys)].copy()
    add_size(table, runs)
    for column in TEST_COLUMNS:
        if column in runs and runs[column].notna().any():
            table[column] = runs[column]
    totals = runs["n_epochs"] if "n_epochs" in runs else [None] * len(runs)  # a config may lack it
    table["epochs"] = [f"{done}/{format_cell(total, False)}" for done, total in zip(runs["epochs_done"], totals,
                                                                                   strict=True)]
    for column in METRICS[1:]:
        table[column] = runs[column]
    return table


def add_size(table, source):
    """Parameters and MACs per image, when any run recorded them (runs started before they were show '-')."""
    for column, shown in SIZE.items():
        if column in source and source[column].notna().any():
            table[shown] = source[column].astype(object).where(source[column].notna(), None)


def grouped_table(grouped):
    """The columns of the seeds-aggregated table, from `group_seeds`' DataFrame: the config keys that differ
    between the groups, n, finished, evaluated (with test results), the model's size, and each metric as
    'mean ± std' (the mean alone for one run)."""
    table = grouped[group_keys(grouped)].copy()
    table["n"], table["finished"] = grouped["n"], grouped["finished"]
    shown = [m for m in (*GROUPED_METRICS[:2], *TEST_COLUMNS, GROUPED_METRICS[2])
             if f"{m}_mean" in grouped and grouped[f"{m}_mean"].notna().any()]
    if any(is_test_metric(m) for m in shown):
        table["evaluated"] = grouped["evaluated"]
    add_size(table, grouped)
    for metric in shown:
        table[metric] = [mean_std(m, s) for m, s in zip(grouped[f"{metric}_mean"], grouped[f"{metric}_std"],
                                                        strict=True)]
    return table


def group_keys(grouped):
    """The config keys whose values differ between `group_seeds`' groups: what tells the groups apart."""
    return differing_keys(grouped, [c for c in grouped.columns if c not in GROUP_COUNTS
                                    and not c.endswith(("_mean", "_std"))])


def group_labels(grouped):
    """Each group as 'key=value, ...' of the keys that tell the groups apart ('all runs' for one group)."""
    keys = group_keys(grouped)
    if not keys:
        return ["all runs"] * len(grouped)
    return [", ".join(f"{k}={format_cell(v, False)}" for k, v in zip(keys, row, strict=True))
            for row in grouped[keys].itertuples(index=False)]


def grouped_numbers(grouped):
    """What --csv writes of the grouped table: the keys that differ, the counts, the size, every mean and std."""
    columns = [*group_keys(grouped), *(c for c in GROUP_COUNTS if c in grouped),
               *(c for c in grouped.columns if c.endswith(("_mean", "_std")))]
    table = grouped[columns].copy()
    for column in ("seeds", "runs"):
        table[column] = [" ".join(map(str, values)) for values in table[column]]
    return table


def mean_std(mean, std):
    if is_missing(mean):
        return None
    return f"{mean:.4f}" if is_missing(std) else f"{mean:.4f} ± {std:.4f}"


def grouped_text(runs):
    """What a sweep with seeds ends with: `load_runs`' table, seeds aggregated, as text."""
    return as_text(grouped_table(group_seeds(runs)))


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
    """Metrics with 4 decimals; config values in as few digits as tell them apart (1e-05, 0.05, 32); the
    parameters with thousands separators, MACs in millions."""
    if is_missing(value):
        return "-"
    if metric == "parameters":
        return f"{int(value):,}"
    if metric == "MACs":
        return format_macs(value)
    if isinstance(value, float):
        return f"{value:.4f}" if metric else f"{value:.6g}"
    return str(value)


def rows_of(table):
    kinds = [c if c in SIZE.values() else c in METRICS or is_test_metric(c) for c in table.columns]
    return [[format_cell(v, k) for v, k in zip(row, kinds, strict=True)] for row in table.itertuples(index=False)]


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
