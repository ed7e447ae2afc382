"""A table of every run under a folder: python src/scripts/report.py RESULTS_DIR

Shows each run's path, the config keys whose values differ between the runs, epochs done, its state
(finished, running, stopped), best and last validation accuracy, and training time. Folders that
cannot be read are listed below the table, never a crash.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from anywhere, no PYTHONPATH

from src.signals import exit_at_once_on  # noqa: E402  (os and signal only: in place before the slow imports)

if __name__ == "__main__":
    exit_at_once_on("SIGINT")

from src.cli import dispatch, exit_codes  # noqa: E402
from src.errors import UsageError  # noqa: E402
from src.run_table import as_markdown, as_text, build_table, sort_table  # noqa: E402, F401  (sort_table: public)


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
