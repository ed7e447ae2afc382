"""A search's results: the trials table (read from the study and the trial folders), the best trial's command,
and its figures (history.png, params.png in the search folder). search.py prints them at its end, and
report.py SEARCH_DIR prints them for a search folder at any time."""
import shlex
import sys
from pathlib import Path

from src.runs.reading import UnreadableRun, read_status
from src.sweep.plan import _text
from src.sweep.search import trial_folder

HISTORY, PARAMS = "history.png", "params.png"
STATES = {"COMPLETE": "complete", "PRUNED": "pruned", "RUNNING": "running", "FAIL": "failed", "WAITING": "waiting"}


def trials_table(search):
    """A row per trial, best first by the metric (a pruned trial's value is at the epoch it stopped; a running
    one's its last reported): trial, state, the metric, epochs trained, each searched key's value."""
    import pandas as pd

    metric, rows = search.record["metric"], []
    for trial in search.trials():
        values = trial.intermediate_values
        value = trial.value if trial.value is not None else (values[max(values)] if values else None)
        row = {"trial": trial.number, "state": STATES.get(trial.state.name, trial.state.name.lower()),
               metric: value, "epochs": epochs_trained(trial_folder(search.search_dir, trial.number))}
        point = search.point_of(trial) or {}
        row.update({d.key: point.get(d.key) for d in search.dimensions})
        rows.append(row)
    table = pd.DataFrame(rows, columns=["trial", "state", metric, "epochs", *(d.key for d in search.dimensions)])
    if table.empty:
        return table
    from src.extensions.search_trial import maximized

    return table.sort_values(metric, ascending=not maximized(metric), na_position="last", kind="stable")


def epochs_trained(folder):
    try:
        status = read_status(folder)
    except (OSError, UnreadableRun):
        return 0
    done = status.get("epochs_done") if isinstance(status, dict) else None
    return done if type(done) is int else 0


def best_command(search):
    """How to train the best complete trial's point again, in a folder of its own, or None."""
    import optuna

    done = [t for t in search.trials() if t.state == optuna.trial.TrialState.COMPLETE]
    if not done:
        return None
    best = search.study.best_trial
    arguments = search.arguments(search.point_of(best))
    runner = Path(search.family.runner).relative_to(Path(__file__).resolve().parents[2])
    folder = f"{search.search_dir}_best"
    words = ["python", str(runner), search.record["config"], folder, *arguments]
    return (f"best: trial {best.number}, {search.record['metric']} {best.value:.4f}; to train it again:\n  "
            + " ".join(shlex.quote(word) for word in words))


def draw_search(search, table):
    """history.png and params.png in the search folder (a figure that cannot be written is said, not fatal)."""
    from src.extensions.search_trial import maximized
    from src.runs.plots import plot_search_history, plot_search_params

    if table.empty:
        return
    metric, name = search.record["metric"], search.search_dir.name
    dimensions = [(d.key, d.kind, d.log, [_text(v) for v in d.corners(search.base)] if d.kind == "choice" else [])
                  for d in search.dimensions]
    shown = table.copy()
    for key, kind, _, _ in dimensions:
        if kind == "choice":
            shown[key] = [_text(value) if value is not None else None for value in shown[key]]
    try:
        plot_search_history(shown, metric, maximized(metric), search.search_dir / HISTORY,
                            f"{name}: {metric} per trial")
        plot_search_params(shown, metric, dimensions, search.search_dir / PARAMS, f"{name}: {metric} by value")
    except OSError as e:
        print(f"warning: the search's figures were not written ({e})", file=sys.stderr)
