"""Runs with `valid_every > 1` log null validation columns in the epochs between: tables and figures use the
epochs that were validated (last_valid_acc is the last one measured; the validation line joins those epochs)."""
import json
import shutil
from pathlib import Path

import pandas as pd

import src.runs.plots
from src.analysis import summarize_run

OLD_RUN = Path(__file__).parent / "data" / "run_v1_2c3368b"


def test_last_valid_acc_is_the_last_epoch_validated(tmp_path):
    run = shutil.copytree(OLD_RUN, tmp_path / "run")
    rows = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    rows[-1].update(valid_acc=None, valid_loss=None)  # the last row of a run stopped after an unvalidated epoch
    (run / "log.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    _, metrics = summarize_run(run)
    assert metrics["last_valid_acc"] == rows[-2]["valid_acc"]


def test_the_validation_line_joins_the_epochs_validated(tmp_path, monkeypatch):
    figures = []
    monkeypatch.setattr(src.runs.plots, "_save", lambda figure, path: figures.append(figure))
    log = pd.DataFrame({"epoch": [1, 2, 3, 4, 5], "train_loss": [2.0, 1.8, 1.6, 1.5, 1.4],
                        "train_acc": [0.2, 0.3, 0.4, 0.5, 0.6], "valid_loss": [1.9, None, None, 1.5, 1.4],
                        "valid_acc": [0.25, None, None, 0.5, 0.55]})
    src.runs.plots.plot_curves(log, tmp_path / "curves.png", "run")
    src.runs.plots.plot_runs({"run": log}, tmp_path / "runs.png")
    src.runs.plots.plot_groups({"group": [log, log]}, tmp_path / "groups.png")
    for figure in figures:
        valid_lines = [line for axes in figure.axes for line in axes.get_lines()
                       if line.get_label() in ("validation", "run", "group")]
        assert valid_lines
        for line in valid_lines:
            assert list(line.get_xdata()) == [1, 4, 5]
            assert not pd.isna(list(line.get_ydata())).any()
