"""Read run folders back in a notebook: `ml = load_main_loop("results/my_run")`, `load_runs("results")`.

Reading never runs code from a folder: checkpoints load with `torch.load(weights_only=True)`.
"""
import functools
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from src.run_folder import BEST_MODEL, CHECKPOINTS, CONFIG, LOG, STATUS

# The columns `load_runs` adds to a run's config keys.
RUN_METRICS = ("state", "epochs_done", "best_valid_acc", "last_valid_acc", "last_train_loss", "training_hours")


@dataclass
class LoadedRun:
    """A run as a notebook sees it. `model` is None before the first checkpoint."""

    path: Path
    config: dict
    log: "pandas.DataFrame"  # noqa: F821
    model: "torch.nn.Module | None"  # noqa: F821
    status: dict
    build_model: object = field(default=None, repr=False)
    checkpoint: "Path | None" = None  # the file `model` was loaded from

    @functools.cached_property
    def best_model(self):
        """The weights with the best validation accuracy (eval mode), or None before the first epoch."""
        from src.checkpoint import load_tensors

        best = self.path / BEST_MODEL
        if not best.exists():
            return None
        model = _build(self.config, self.build_model)
        model.load_state_dict(load_tensors(best))
        return model.eval()


def read_log(path):
    """The per-epoch log of the run in `path` as a DataFrame (empty before the first epoch)."""
    import pandas as pd

    log_file = Path(path) / LOG
    rows = [json.loads(line) for line in log_file.read_text().splitlines() if line] if log_file.exists() else []
    return pd.DataFrame(rows)


def read_status(path, config):
    status_file = Path(path) / STATUS
    if status_file.exists():
        return json.loads(status_file.read_text())
    return {"epochs_done": 0, "iterations_done": 0, "n_epochs": config["n_epochs"], "finished": False}


def load_main_loop(save_path, build_model=None):
    """-> LoadedRun(config, log (one row per finished epoch), model (latest weights, eval mode), status)."""
    from src.checkpoint import load_newest

    path = Path(save_path)
    if not (path / CONFIG).exists():
        raise FileNotFoundError(f"{path} is not a run folder: it has no {CONFIG}")
    config = json.loads((path / CONFIG).read_text())
    found = load_newest(path / CHECKPOINTS, ("model",), warn=lambda line: None)
    model = None
    if found is not None:
        model = _build(config, build_model)
        model.load_state_dict(found[1]["model"])
        model.eval()
    return LoadedRun(path, config, read_log(path), model, read_status(path, config), build_model,
                     found[0] if found else None)


def _build(config, build_model):
    if build_model is None:
        from src.models import build_simple_cnn as build_model
    return build_model(config)


def run_state(path, status):
    """'finished', 'running' (a live process holds the run folder) or 'stopped' (killed, crashed or interrupted)."""
    if status.get("finished"):
        return "finished"
    return "running" if _holds_lock(path) else "stopped"


def _holds_lock(path):
    """True when some process holds the run folder's lock (the pid in .lock may be reused by another)."""
    import fcntl

    try:
        fd = os.open(Path(path) / ".lock", os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # closing drops the shared lock at once
    return False


def find_runs(folder):
    """Run folders (those with a config.json) under `folder`, at any depth, sorted by path."""
    found = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if d not in (CHECKPOINTS, "tensorboard") and not d.startswith("."))
        if CONFIG in files:
            found.append(Path(root))
    return sorted(found)


def summarize_run(path):
    """One row for a table of runs: config keys plus where the run is and how well it does (no weights loaded)."""
    config = json.loads((Path(path) / CONFIG).read_text())
    if not isinstance(config, dict):
        raise ValueError(f"{CONFIG} is not a config")
    log = read_log(path)
    status = read_status(path, config)
    has_valid = "valid_acc" in log and log["valid_acc"].notna().any()
    metrics = {
        "state": run_state(path, status),
        "epochs_done": int(status.get("epochs_done", len(log))),
        "best_valid_acc": float(log["valid_acc"].max()) if has_valid else None,
        "last_valid_acc": float(log["valid_acc"].iloc[-1]) if has_valid else None,
        "last_train_loss": float(log["train_loss"].iloc[-1]) if len(log) else None,
        "training_hours": float(log["epoch_seconds"].sum()) / 3600 if len(log) else 0.0,
    }
    assert tuple(metrics) == RUN_METRICS
    return config, metrics


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
