"""A table of every run under a folder: python src/scripts/report.py RESULTS_DIR

Shows each run's path, the config keys whose values differ between the runs, epochs done, its state
(finished, running, stopped), best and last validation accuracy, and training time. Folders that
cannot be read are listed below the table, never a crash.
"""
import os
import signal
import sys


def _exit_at_once(number, frame):
    os.write(2, b"SIGINT: exiting now\n")
    os._exit(130)


# As a script, Ctrl-C exits at once, quietly, with 130, as the runner does outside its loop: files are
# replaced atomically, so nothing is left half-written, and a KeyboardInterrupt raised inside an import
# could surface as an ImportError and its traceback. (The training loop and a sweep take SIGINT over.)
if __name__ == "__main__":
    signal.signal(signal.SIGINT, _exit_at_once)

import json  # noqa: E402
import numbers  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from anywhere, no PYTHONPATH

from src.cli import dispatch, exit_codes  # noqa: E402
from src.errors import UsageError  # noqa: E402

METRICS = ["epochs", "state", "best_valid_acc", "last_valid_acc", "training_hours"]


def differing_keys(table, config_keys):
    """Config keys with more than one value among the runs (lists and dicts compared as JSON)."""
    return [key for key in config_keys if table[key].map(lambda v: json.dumps(v, sort_keys=True)).nunique() > 1]


def build_table(runs):
    """The report's columns, from `load_runs`' DataFrame."""
    from src.analysis import RUN_METRICS

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


@exit_codes
def main(results_dir, *, csv=None, markdown=None, sort="run", reverse=False, plot=None, runs=None):
    """Print the run table of RESULTS_DIR; --csv/--markdown FILE write it too; --plot FILE overlays the curves
    of the runs (all, or --runs NAME,NAME,...); --sort COLUMN (--reverse for descending)."""
    from src.analysis import load_runs, read_log
    from src.files import atomic_write

    folder = Path(results_dir)
    if not folder.is_dir():
        raise UsageError(f"{folder} is not a folder")
    found = load_runs(folder)
    for path, reason in found.attrs["skipped"]:
        print(f"note: skipped {path}: {reason}", file=sys.stderr)
    if found.empty:
        print(f"no runs under {folder}")
        return 0
    table = build_table(found)
    if sort not in table.columns:
        raise UsageError(f"cannot sort by '{sort}'; columns: {', '.join(table.columns)}")
    table = sort_table(table, sort, reverse, found["epochs_done"] if sort == "epochs" else None)  # 9/30 < 10/30
    print(as_text(table), end="")
    if csv:  # written whole or not at all, like every file here
        text = table.to_csv(index=False)
        atomic_write(Path(csv), lambda f: f.write(text.encode()))
        print(f"wrote {csv}")
    if markdown:
        text = as_markdown(table)
        atomic_write(Path(markdown), lambda f: f.write(text.encode()))
        print(f"wrote {markdown}")
    if plot:
        from src.plots import plot_runs

        chosen = runs.split(",") if runs else list(table["run"])
        unknown = sorted(set(chosen) - set(table["run"]))
        if unknown:
            raise UsageError(f"no run named {', '.join(unknown)} under {folder}")
        plot_runs({name: read_log(folder / name) for name in chosen}, plot, title=f"Runs in {folder}")
        print(f"wrote {plot}")
    return 0


if __name__ == "__main__":
    dispatch(main, description=__doc__)
