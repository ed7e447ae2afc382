"""Read run folders back in a notebook: `ml = load_main_loop("results/my_run")`.

Reading never runs code from the folder: checkpoints load with `torch.load(weights_only=True)`.
"""
import json
from dataclasses import dataclass
from pathlib import Path

from src.run_folder import BEST_MODEL, CHECKPOINTS, CONFIG, LOG, STATUS


@dataclass
class LoadedRun:
    """A run as a notebook sees it. `model` is None before the first checkpoint."""

    path: Path
    config: dict
    log: "pandas.DataFrame"  # noqa: F821
    model: "torch.nn.Module | None"  # noqa: F821
    status: dict

    def load_best_model(self):
        """The weights with the best validation accuracy (eval mode), or None before the first epoch."""
        best = self.path / BEST_MODEL
        return _load_model(self.config, best) if best.exists() else None


def load_main_loop(save_path, build_model=None):
    """-> LoadedRun(config, log (one row per finished epoch), model (latest weights, eval mode), status)."""
    import pandas as pd

    from src.checkpoint import load_newest

    path = Path(save_path)
    if not (path / CONFIG).exists():
        raise FileNotFoundError(f"{path} is not a run folder: it has no {CONFIG}")
    config = json.loads((path / CONFIG).read_text())
    rows = [json.loads(line) for line in (path / LOG).read_text().splitlines()] if (path / LOG).exists() else []
    log = pd.DataFrame(rows)
    status = json.loads((path / STATUS).read_text()) if (path / STATUS).exists() else {
        "epochs_done": 0, "iterations_done": 0, "n_epochs": config["n_epochs"], "finished": False}
    found = load_newest(path / CHECKPOINTS, ("model",), warn=lambda line: None)
    model = None
    if found is not None:
        model = _build(config, build_model)
        model.load_state_dict(found[1]["model"])
        model.eval()
    return LoadedRun(path, config, log, model, status)


def _build(config, build_model):
    if build_model is None:
        from src.models import build_simple_cnn as build_model
    return build_model(config)


def _load_model(config, weights_path, build_model=None):
    from src.checkpoint import load_tensors

    model = _build(config, build_model)
    model.load_state_dict(load_tensors(weights_path))
    return model.eval()
