"""Load one run folder back in a notebook: `ml = load_main_loop("results/my_run")` (tables of many runs:
src.analysis.runs).

Reading never runs code from a folder: checkpoints load with `torch.load(weights_only=True)`. What a
folder holds is checked as it is read: a file that is not what the runner writes (edited, truncated,
copied from another run) raises `UnreadableRun`, one line naming the file, never a stray traceback.
"""
import functools
from dataclasses import dataclass, field
from pathlib import Path

from configs import family
from src.config import check_value
from src.errors import UsageError
from src.files import RunFolderLock
from src.runs.folder import is_finished
from src.runs.names import BEST_MODEL, CHECKPOINTS, CONFIG
from src.runs.reading import UnreadableRun, read_log, read_object, read_status

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
        from src.runs.checkpoints import load_tensors

        best = self.path / BEST_MODEL
        if not best.exists():
            return None
        model = _build(self.config, self.build_model, self.path / CONFIG)
        _load_weights(model, load_tensors(best), best, self.path / CONFIG)
        return model.eval()


def not_started(config):
    """The status of a run with no status.json yet."""
    return {"epochs_done": 0, "iterations_done": 0, "n_epochs": config["n_epochs"], "finished": False}


def read_config(path, check=False):
    """config.json of the run in `path`, completed with the keys its family's root gained since the run was
    saved (at their root values, which keep its behaviour). With `check`, as the family's runner would
    accept it too: every key of the root's type, and valid."""
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
    src.runs.checkpoints.CorruptCheckpoint when no checkpoint is whole.
    """
    from src.runs.checkpoints import load_newest

    path = Path(save_path)
    if not (path / CONFIG).exists():
        raise FileNotFoundError(f"{path} is not a run folder: it has no {CONFIG}")
    config = read_config(path, check=build_model is None)
    log, status = read_log(path), read_status(path) or not_started(config)
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
    """'finished', 'running' (a live process holds the run folder), 'pruned' (a search's pruner stopped it:
    src.extensions.search_trial) or 'stopped' (killed, crashed or interrupted)."""
    if is_finished(status, config["n_epochs"]):
        return "finished"
    if RunFolderLock.is_held(path):
        return "running"
    return "pruned" if isinstance(status, dict) and status.get("pruned_at_epoch") else "stopped"
