"""Read run folders back in a notebook: `ml = load_main_loop("results/my_run")`, `load_runs("results")`.

Reading never runs code from a folder: checkpoints load with `torch.load(weights_only=True)`. What a
folder holds is checked as it is read: a file that is not what the runner writes (edited, truncated,
copied from another run) raises `UnreadableRun`, one line naming the file, never a stray traceback.
"""
import functools
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from src.files import RunFolderLock
from src.config import MAX_NESTING, check_value, nesting_depth
from src.errors import RunError, UsageError
from src.run_folder import BEST_MODEL, CHECKPOINTS, CONFIG, LOG, META, RESUMABLE_CHANGES, STATUS, is_finished

# The columns `load_runs` adds to a run's config keys (and, after them, the numbers evaluate.py saved: TEST_MODELS).
RUN_METRICS = ("state", "epochs_done", "best_valid_acc", "last_valid_acc", "last_train_loss", "training_hours",
               "parameters", "macs_per_image")
# evaluate.py's files (eval_<set>.json) name each number by the model it measured: `best_test_acc`,
# `last_cifar10.1_ece`, `ema_test_acc_flip`, ...; these are the run table's columns of test results.
TEST_MODELS = ("last", "best", "ema")
TEST_SETS = ("test", "cifar10.1", "cifar10c")  # evaluate.py --test_set
EVAL_FILES = "eval_*.json"
TEST_PREFIXES = tuple(f"{model}_{test_set}_" for model in TEST_MODELS for test_set in TEST_SETS)
# Columns of log.jsonl that hold numbers (or null); anything else there means the file is not a log.
LOG_NUMBERS = ("epoch", "iteration", "train_loss", "train_acc", "valid_loss", "valid_acc", "lr", "epoch_seconds",
               "images_per_second", "finished_at", "ema_valid_loss", "ema_valid_acc")
STATUS_COUNTS = ("epochs_done", "iterations_done", "n_epochs")


class UnreadableRun(RunError, ValueError):
    """A file of a run folder is not what the runner writes; the message names it (exit 1 in the scripts)."""


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
    ema_model: "torch.nn.Module | None" = None  # the EMA of the weights in that checkpoint, when `ema` was on  # noqa: F821

    @functools.cached_property
    def best_model(self):
        """The weights with the best validation accuracy (eval mode), or None before the first epoch."""
        from src.checkpoint import load_tensors

        best = self.path / BEST_MODEL
        if not best.exists():
            return None
        model = _build(self.config, self.build_model, self.path / CONFIG)
        _load_weights(model, load_tensors(best), best, self.path / CONFIG)
        return model.eval()


def parse_json(text, where):
    """The value of the JSON `text`; UnreadableRun naming `where` when it is not JSON or nests absurdly deep."""
    try:
        value = json.loads(text)
    except ValueError as e:
        raise UnreadableRun(f"{where} is not valid JSON ({str(e)[:100]})") from None
    except RecursionError:  # json gives up a few thousand levels deep
        raise UnreadableRun(f"{where} nests lists or dicts too deeply to read") from None
    if nesting_depth(value) > MAX_NESTING:
        raise UnreadableRun(f"{where} nests lists or dicts more than {MAX_NESTING} deep")
    return value


def read_object(path):
    """The JSON object (a dict) in the file `path`; FileNotFoundError when there is none."""
    try:
        text = Path(path).read_text()
    except UnicodeDecodeError:
        raise UnreadableRun(f"{path} is not valid JSON (not UTF-8 text)") from None
    value = parse_json(text, path)
    if not isinstance(value, dict):
        raise UnreadableRun(f"{path} holds a JSON {json_kind(value)}, not an object of key: value")
    return value


def json_kind(value):
    """What JSON calls the type of `value`, as parsed by json.loads."""
    if isinstance(value, bool):
        return "boolean"
    names = {dict: "object", list: "array", str: "string", int: "number", float: "number", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def read_log(path):
    """The per-epoch log of the run in `path` as a DataFrame (empty before the first epoch)."""
    import pandas as pd

    log_file = Path(path) / LOG
    try:
        lines = log_file.read_text().splitlines() if log_file.exists() else []
    except UnicodeDecodeError:
        raise UnreadableRun(f"{log_file} is not a log (not UTF-8 text)") from None
    rows = []
    for number, line in enumerate(lines, 1):
        if line.strip():
            rows.append(_log_row(parse_json(line, f"{log_file} line {number}"), f"{log_file} line {number}"))
    return pd.DataFrame(rows)


def _log_row(row, where):
    if not isinstance(row, dict):
        raise UnreadableRun(f"{where} is a JSON {json_kind(row)}, not an object")
    for key in LOG_NUMBERS:
        if row.get(key) is not None and not _is_number(row[key]):
            raise UnreadableRun(f"{where}: {key} is {_shown(row[key])}, not a number")
    return row


def _is_number(value):
    """A float (nan and inf included: a diverged validation may log them), or an int that fits 64 bits."""
    if isinstance(value, bool):
        return False
    return isinstance(value, float) or (isinstance(value, int) and -2**63 <= value < 2**63)


def _shown(value):
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:40] + "..."


def read_status(path, config):
    status_file = Path(path) / STATUS
    if not status_file.exists():
        return {"epochs_done": 0, "iterations_done": 0, "n_epochs": config["n_epochs"], "finished": False}
    status = read_object(status_file)
    for key in STATUS_COUNTS:
        value = status.get(key)
        if value is not None and not (_is_number(value) and isinstance(value, int) and 0 <= value):
            raise UnreadableRun(f"{status_file}: {key} is {_shown(value)}, not a count")
    return status


def read_config(path, check=False):
    """config.json of the run in `path`, completed with the keys its family's root gained since the run was
    saved (at their root values, which keep its behaviour). With `check`, as the family's runner would
    accept it too: every key of the root's type, and valid."""
    from src.config import family

    config_file = Path(path) / CONFIG
    saved = read_object(config_file)
    try:
        registry = family(saved)
        config, _ = registry.complete(saved, where=config_file)
        if not check:
            return config
        root = registry.root
        config = {key: check_value(key, value, root) for key, value in config.items()}
    except UsageError as e:
        raise UnreadableRun(f"{config_file}: {e}" if str(config_file) not in str(e) else str(e)) from None
    problems = registry.problems(config)
    if problems:
        raise UnreadableRun(f"{config_file}: {'; '.join(problems)}")
    return config


def load_main_loop(save_path, build_model=None):
    """-> LoadedRun(config, log (one row per finished epoch), model (latest weights, eval mode), status).

    Raises FileNotFoundError for a folder that is no run, UnreadableRun for a file that cannot be used,
    src.checkpoint.CorruptCheckpoint when no checkpoint is whole.
    """
    from src.checkpoint import load_newest

    path = Path(save_path)
    if not (path / CONFIG).exists():
        raise FileNotFoundError(f"{path} is not a run folder: it has no {CONFIG}")
    config = read_config(path, check=build_model is None)
    log, status = read_log(path), read_status(path, config)
    found = load_newest(path / CHECKPOINTS, ("model",), warn=lambda line: None)
    model = ema_model = None
    if found is not None:
        model = _load_model(config, build_model, found[1]["model"], found[0], path / CONFIG)
        ema = found[1].get("ema")
        if isinstance(ema, dict) and "model" in ema:
            ema_model = _load_model(config, build_model, ema["model"], found[0], path / CONFIG)
    return LoadedRun(path, config, log, model, status, build_model, found[0] if found else None, ema_model)


def _load_model(config, build_model, weights, source, config_file):
    model = _build(config, build_model, config_file)
    _load_weights(model, weights, source, config_file)
    return model.eval()


def _build(config, build_model, config_file):
    if build_model is None:
        from src.models import build_model
    try:
        return build_model(config)
    except (KeyError, TypeError, ValueError) as e:  # a key missing from, or mistyped in, config.json
        raise UnreadableRun(f"{config_file} does not describe a model that can be built "
                            f"({type(e).__name__}: {str(e)[:150]})") from e


def _load_weights(model, weights, source, config_file):
    """`weights` into `model`, or one line saying why they do not fit it (other sizes, another model, no weights)."""
    try:
        model.load_state_dict(weights)
    except (RuntimeError, TypeError, AttributeError, KeyError, ValueError) as e:
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        detail = (lines[1] if len(lines) > 1 else lines[0] if lines else type(e).__name__)[:200]
        raise UnreadableRun(f"{source} does not fit the model that {config_file} describes ({detail}); "
                            "was one of them edited, or copied from another run?") from None


def run_state(path, status, config):
    """'finished', 'running' (a live process holds the run folder) or 'stopped' (killed, crashed or interrupted)."""
    if is_finished(status, config["n_epochs"]):
        return "finished"
    return "running" if RunFolderLock.is_held(path) else "stopped"


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
    config = read_config(path)
    log = read_log(path)
    status = read_status(path, config)
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
        size[key] = value if _is_number(value) and isinstance(value, int) and value >= 0 else None
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
            if is_test_metric(key) and _is_number(value):
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


# What `group_seeds` adds beside the config keys; every metric becomes `<metric>_mean` and `<metric>_std`.
GROUP_COUNTS = ("n", "finished", "evaluated", "seeds", "runs", "parameters", "macs_per_image")
GROUPED_METRICS = ("best_valid_acc", "last_valid_acc", "training_hours")
# Keys that decide only when to checkpoint and what to log, not what is computed: seeds differing in them
# are still one configuration (and the grouped table leaves them out).
NOT_CONFIGURATION = tuple(key for key in RESUMABLE_CHANGES if key != "n_epochs")


def group_seeds(runs):
    """`load_runs`' table with one row per configuration without its seed, in the order of its first run:
    the config keys (but those that decide only when to checkpoint and whether to write TensorBoard
    events), `n` (runs), `finished`, `evaluated` (runs with test results), `seeds`, `runs`, the model's
    `parameters` and `macs_per_image`, and the mean and standard deviation (n - 1 in the denominator; NaN
    for a single run) of the best and last validation accuracy, of every number evaluate.py saved, and of
    the training hours, each over the runs that have it."""
    import pandas as pd

    if runs.empty:
        return pd.DataFrame()
    tests = sorted(c for c in runs.columns if is_test_metric(c))
    keys = [c for c in runs.columns if c not in ("run", "seed", *RUN_METRICS, *NOT_CONFIGURATION) and c not in tests]
    groups = {}
    for position, values in enumerate(runs[keys].itertuples(index=False)):
        groups.setdefault(tuple(json.dumps(_plain(v), sort_keys=True) for v in values), []).append(position)
    rows = []
    for positions in groups.values():
        members = runs.iloc[positions]
        row = dict(zip(keys, members[keys].iloc[0], strict=True))
        row.update(n=len(members), finished=int((members["state"] == "finished").sum()),
                   evaluated=int(members[tests].notna().any(axis=1).sum()) if tests else 0,
                   seeds=list(members["seed"]) if "seed" in members else [], runs=list(members["run"]),
                   parameters=_first(members["parameters"]), macs_per_image=_first(members["macs_per_image"]))
        for metric in (*GROUPED_METRICS[:2], *tests, GROUPED_METRICS[2]):
            present = members[metric].dropna().astype(float)
            row[f"{metric}_mean"] = present.mean() if len(present) else None
            row[f"{metric}_std"] = present.std(ddof=1) if len(present) > 1 else None
        rows.append(row)
    return pd.DataFrame(rows)


def _plain(value):
    """A config value as JSON can hold it: pandas fills a key a run's config lacks with NaN."""
    if isinstance(value, float) and value != value:
        return None
    return value.item() if hasattr(value, "item") and not isinstance(value, (list, dict)) else value


def _first(column):
    present = column.dropna()
    return int(present.iloc[0]) if len(present) else None
