"""A table of every run under a folder: python src/scripts/report.py RESULTS_DIR

Shows each run's path, the config keys whose values differ between the runs, epochs done, its state
(finished, running, stopped), best and last validation accuracy, and training time. Folders that
cannot be read are listed below the table, never a crash.
"""
import json
import sys
from pathlib import Path

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
    table["epochs"] = runs["epochs_done"].astype(str) + "/" + runs["n_epochs"].astype(str)
    for column in METRICS[1:]:
        table[column] = runs[column]
    return table


def format_cell(value, metric):
    """Metrics with 4 decimals; config values in as few digits as tell them apart (1e-05, 0.05, 32)."""
    if value is None or value != value:  # None or NaN
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
    order = found["epochs_done"] if sort == "epochs" else table[sort]  # "9/30" before "10/30"
    table = table.iloc[order.reset_index(drop=True).sort_values(ascending=not reverse, na_position="last",
                                                                kind="stable").index]
    print(as_text(table), end="")
    if csv:
        table.to_csv(csv, index=False)
        print(f"wrote {csv}")
    if markdown:
        Path(markdown).write_text(as_markdown(table))
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
