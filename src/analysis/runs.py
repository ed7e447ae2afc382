"""Tables of runs: `load_runs("results")`, a row per run folder under a folder (config keys, where the run
is, how well it does, the numbers evaluate.py saved), read without loading any weights.
"""
import os
from pathlib import Path

from src.analysis.load import not_started, read_config, run_state
from src.runs.names import CHECKPOINTS, CONFIG, EVAL_FILES, META, TENSORBOARD
from src.runs.reading import is_number, read_log, read_object, read_status

# The columns `load_runs` adds to a run's config keys (and, after them, the numbers evaluate.py saved: TEST_MODELS).
RUN_METRICS = ("state", "epochs_done", "best_valid_acc", "last_valid_acc", "last_train_loss", "training_hours",
               "parameters", "macs_per_image")
# evaluate.py's files (eval_<set>.json) name each number by the model it measured: `best_test_acc`,
# `last_cifar10.1_ece`, `ema_test_acc_flip`, ...; these are the run table's columns of test results.
TEST_MODELS = ("last", "best", "ema")
TEST_SETS = ("test", "cifar10.1", "cifar10c")  # evaluate.py --test_set
TEST_PREFIXES = tuple(f"{model}_{test_set}_" for model in TEST_MODELS for test_set in TEST_SETS)



def find_runs(folder):
    """Run folders (those with a config.json) under `folder`, at any depth, sorted by path."""
    found = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if d not in (CHECKPOINTS, TENSORBOARD) and not d.startswith("."))
        if CONFIG in files:
            found.append(Path(root))
    return sorted(found)


def summarize_run(path):
    """One row for a table of runs: config keys plus where the run is and how well it does (no weights loaded)."""
    config = read_config(path)
    log = read_log(path)
    status = read_status(path) or not_started(config)
    has_valid = "valid_acc" in log and log["valid_acc"].notna().any()
    metrics = {
        "state": run_state(path, status, config),
        "epochs_done": int(status.get("epochs_done", len(log))),
        "best_valid_acc": float(log["valid_acc"].max()) if has_valid else None,
        # the last epoch validated: with valid_every > 1 the epochs between log null
        "last_valid_acc": float(log["valid_acc"].dropna().iloc[-1]) if has_valid else None,
        "last_train_loss": float(log["train_loss"].iloc[-1]) if len(log) else None,
        # Python's sum: absurd logged times add up to inf quietly, where numpy's would warn of an overflow
        "training_hours": sum(log["epoch_seconds"].dropna().tolist(), 0.0) / 3600 if len(log) else 0.0,
        **read_model_size(path),
    }
    assert tuple(metrics) == RUN_METRICS
    return config, {**metrics, **read_test_results(path)}


def read_model_size(path):
    """Parameters and MACs per image as the run's newest session recorded them in meta.json (None for a run
    started before they were recorded). meta.json is a history, not a result: a damaged one gives None."""
    try:
        meta = read_object(Path(path) / META)
    except (OSError, ValueError):
        meta = {}
    size = {}
    for key in ("parameters", "macs_per_image"):
        value = meta.get(key)
        size[key] = value if is_number(value) and isinstance(value, int) and value >= 0 else None
    return size


def is_test_metric(column):
    """A column of numbers evaluate.py saved (`best_test_acc`, `ema_cifar10c_acc`, ...), not a config key."""
    return isinstance(column, str) and column.startswith(TEST_PREFIXES)


def read_test_results(path):
    """Every number evaluate.py saved for this run, from its eval_<set>.json files: {`best_test_acc`: 0.91, ...}."""
    results = {}
    for file in sorted(Path(path).glob(EVAL_FILES)):
        saved = read_object(file)
        for key, value in saved.items():
            if is_test_metric(key) and is_number(value):
                results[key] = float(value)
    return results


def load_runs(folder):
    """A DataFrame with a row per run under `folder`: `run` (path relative to it), config keys, final metrics.

    Folders that look like runs but cannot be read are left out and listed in `.attrs["skipped"]`
    as (path, reason), so one broken folder never hides the others.
    """
    import pandas as pd

    folder = Path(folder)
    rows, skipped = [], []
    for path in find_runs(folder):
        try:
            config, metrics = summarize_run(path)
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            skipped.append((str(path.relative_to(folder)), f"{type(e).__name__}: {e}"))
            continue
        rows.append({"run": str(path.relative_to(folder)) if path != folder else ".", **config, **metrics})
    table = pd.DataFrame(rows)
    table.attrs["skipped"] = skipped
    return table
