"""A table of every run under a folder: python src/scripts/report.py RESULTS_DIR

Shows each run's path, the config keys whose values differ between the runs, the model's parameters and
MACs per image, its test results when evaluate.py saved them, epochs done, its state (finished, running,
stopped), best and last validation accuracy, and training time. With --group-seeds, one row per
configuration without its seed: n, and the mean ± std of each metric. Folders that cannot be read are
listed below the table, never a crash.
"""
import os
import stat
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from anywhere, no PYTHONPATH

from src.signals import exit_at_once_on  # noqa: E402  (os and signal only: in place before the slow imports)

if __name__ == "__main__":
    exit_at_once_on("SIGINT", "SIGTERM")

from src.cli import dispatch, exit_codes  # noqa: E402
from src.errors import UsageError  # noqa: E402
from src.analysis.table import (  # noqa: E402, F401  (sort_table: public)
    as_markdown, as_text, build_table, group_labels, grouped_numbers, grouped_table, sort_table,
)


@exit_codes
def main(results_dir, *, csv=None, markdown=None, sort=None, reverse=False, plot=None, runs=None,
         group_seeds=False):
    """Print the run table of RESULTS_DIR; --csv/--markdown FILE write it too; --plot FILE overlays the curves
    of the runs (all, or --runs NAME,NAME,...); --sort COLUMN (--reverse for descending); --group-seeds: one
    row per configuration without its seed, mean ± std over its seeds (--plot: per configuration of the
    runs drawn, the mean curve with a ±1 std band). --csv - and --markdown - write to standard output."""
    from src.analysis import load_runs

    for option, path in (("--csv", csv), ("--markdown", markdown), ("--plot", plot)):
        check_output(option, path)
    folder = Path(results_dir)
    if not folder.is_dir():
        raise UsageError(f"{folder} is not a folder")
    found = load_runs(folder)
    for path, reason in found.attrs["skipped"]:
        print(f"note: skipped {path}: {reason}", file=sys.stderr)
    if found.empty:
        print(f"no runs under {folder}")
        return 0
    chosen = chosen_runs(found, runs.split(","), folder) if runs else found
    shown, exported = grouped(found, sort, reverse) if group_seeds else ungrouped(found, sort, reverse)
    print(as_text(shown), end="")
    write_outputs(shown, exported, csv, markdown)
    if plot:
        draw(chosen, folder, plot, group_seeds)
        print(f"wrote {plot}")
    from src.sweep.search import RECORD

    if (folder / RECORD).is_file():
        print_search(folder)
    return 0


def print_search(folder):
    """A search folder (search.py): its trials, best first by the metric, with their states, and the best
    trial's command; a study that cannot be read is said in one line."""
    from src.errors import RunError
    from src.sweep.report import best_command, trials_table
    from src.sweep.search import Search

    try:
        search = Search.load(folder)
    except (RunError, UsageError) as e:
        print(f"note: {folder} is a search whose study cannot be read: {e}", file=sys.stderr)
        return
    table = trials_table(search)
    print(f"\nsearch trials ({search.record['metric']}, best first):")
    print(table.to_string(index=False) if not table.empty else "no trials yet")
    best = best_command(search)
    if best:
        print(best)


def chosen_runs(found, names, folder):
    unknown = sorted(set(names) - set(found["run"]))
    if unknown:
        raise UsageError(f"no run named {', '.join(unknown)} under {folder}")
    return found[found["run"].isin(names)].reset_index(drop=True)


def ungrouped(found, sort, reverse):
    """-> (the table shown, the table exported): the same, one row per run."""
    table = build_table(found)
    sort = sort or "run"
    check_sort(sort, table)
    table = sort_table(table, sort, reverse, found["epochs_done"] if sort == "epochs" else None)  # 9/30 < 10/30
    return table, table


def grouped(found, sort, reverse):
    """-> (the table shown: 'mean ± std' cells; the table exported: group_seeds' numbers), in the same order."""
    from src.analysis import group_seeds

    numbers = group_seeds(found)
    table = grouped_table(numbers)
    if sort:
        check_sort(sort, table)
        table = sort_table(table, sort, reverse, numbers[f"{sort}_mean"] if f"{sort}_mean" in numbers else None)
        numbers = numbers.loc[table.index]
    return table, grouped_numbers(numbers)


def check_sort(sort, table):
    if sort not in table.columns:
        raise UsageError(f"cannot sort by '{sort}'; columns: {', '.join(table.columns)}")


KINDS = ((stat.S_ISLNK, "a symbolic link"), (stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO"),
         (stat.S_ISCHR, "a device"), (stat.S_ISBLK, "a device"), (stat.S_ISSOCK, "a socket"))


def check_output(option, path):
    """Before anything is read: an output is '-' (standard output; not for --plot), a new file, or an existing
    regular file. Anything else is refused, since the atomic rename that writes the file would replace it (as
    root, --csv /dev/stdout would have replaced the device node with a file)."""
    if path is None:
        return
    if path == "-":
        if option == "--plot":
            raise UsageError("--plot - : a PNG does not go to standard output; give a file name")
        return
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    except OSError as e:
        raise UsageError(f"{option} {path}: {e.strerror or e}") from None
    kind = next((name for test, name in KINDS if test(mode)), None if stat.S_ISREG(mode) else "not a regular file")
    if kind:
        raise UsageError(f"{option} {path} is {kind}; report.py writes only regular files (or - for standard "
                         "output)")


def write_outputs(shown, exported, csv, markdown):
    from src.files import atomic_write

    for path, text in ((csv, lambda: exported.to_csv(index=False)), (markdown, lambda: as_markdown(shown))):
        if not path:
            continue
        if path == "-":
            sys.stdout.write(text())
            continue
        content = text().encode()
        atomic_write(Path(path), lambda f, content=content: f.write(content))  # written whole or not at all
        print(f"wrote {path}")


def draw(found, folder, plot, group_seeds):
    from src.analysis import group_seeds as groups_of
    from src.analysis import read_log
    from src.runs.plots import plot_groups, plot_runs

    if not group_seeds:
        plot_runs({name: read_log(folder / name) for name in found["run"]}, plot, title=f"Runs in {folder}")
        return
    numbers = groups_of(found)
    curves = {f"{label} (n={len(names)})": [read_log(folder / name) for name in names]
              for label, names in zip(group_labels(numbers), numbers["runs"], strict=True)}
    plot_groups(curves, plot, title=f"Runs in {folder}: mean and ±1 std over seeds")


if __name__ == "__main__":
    dispatch(main, description=__doc__)
