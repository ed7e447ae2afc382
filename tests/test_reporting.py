"""Seeing and comparing runs: the run table, curves, TensorBoard events, evaluation outputs, the example."""
import json
import os
import re
import shutil
import signal
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import REPO, RESUMABLE, TINY, TRAIN_SCRIPT, run_script, start_script, wait_for_mid_epoch_checkpoint
from configs.simple_cnn import simple_cnn_configs
from src.analysis import load_main_loop, load_runs
from src.config import apply_overrides
from src.main_loop import run_main_loop
from src.models import build_simple_cnn

REPORT_SCRIPT = REPO / "src" / "scripts" / "report.py"
EXAMPLE = REPO / "etc" / "analysis_example.py"


@pytest.fixture(scope="session")
def results(tmp_path_factory, data_dir):
    """grid/lr_0.1 and grid/lr_0.2 (finished), short (finished, 1 epoch), stopped (SIGTERM mid-run),
    broken (a config.json that is not JSON) and notes/ (not a run at all)."""
    root = tmp_path_factory.mktemp("results")
    base = apply_overrides(simple_cnn_configs.get("cifar10"), dict(w[2:].split("=", 1) for w in TINY))
    saved_data_dir = os.environ.get("DATA_DIR")
    os.environ["DATA_DIR"] = str(data_dir)
    try:
        assert run_main_loop({**base, "lr": 0.1}, root / "grid" / "lr_0.1", build_simple_cnn) == 0
        assert run_main_loop({**base, "lr": 0.2, "n_epochs": 4}, root / "grid" / "lr_0.2", build_simple_cnn) == 0
        assert run_main_loop({**base, "n_epochs": 1}, root / "short", build_simple_cnn) == 0
    finally:
        if saved_data_dir is None:
            del os.environ["DATA_DIR"]
        else:
            os.environ["DATA_DIR"] = saved_data_dir
    process = start_script(TRAIN_SCRIPT, "cifar10", root / "stopped", *TINY, *RESUMABLE, data_dir=data_dir)
    wait_for_mid_epoch_checkpoint(process, root / "stopped")
    process.send_signal(signal.SIGTERM)
    process.communicate(timeout=60)
    (root / "broken").mkdir()
    (root / "broken" / "config.json").write_text("{not json")
    (root / "notes").mkdir()
    (root / "notes" / "ideas.txt").write_text("try a wider net")
    return root


def assert_real_picture(path, min_size=(300, 200)):
    image = np.asarray(Image.open(path).convert("L"), dtype=float)
    assert image.shape[1] >= min_size[0] and image.shape[0] >= min_size[1]
    assert image.std() > 10, "the picture is blank"
    assert len(np.unique(image)) > 20


def test_load_runs_has_a_row_per_run_and_notes_the_broken_one(results):
    runs = load_runs(results).set_index("run")
    assert sorted(runs.index) == ["grid/lr_0.1", "grid/lr_0.2", "short", "stopped"]
    assert runs.attrs["skipped"] and runs.attrs["skipped"][0][0] == "broken"
    assert runs.loc["grid/lr_0.2", "lr"] == 0.2 and runs.loc["grid/lr_0.2", "epochs_done"] == 4
    assert runs.loc["stopped", "state"] == "stopped" and runs.loc["short", "state"] == "finished"
    assert 0 < runs.loc["stopped", "epochs_done"] < 3 or runs.loc["stopped", "epochs_done"] == 0
    logged = load_main_loop(results / "grid" / "lr_0.1").log
    assert runs.loc["grid/lr_0.1", "best_valid_acc"] == logged["valid_acc"].max()
    assert runs.loc["grid/lr_0.1", "last_valid_acc"] == logged["valid_acc"].iloc[-1]
    assert runs.loc["grid/lr_0.1", "training_hours"] > 0


def test_report_table_shows_differing_keys_and_states(results, data_dir):
    result = run_script(REPORT_SCRIPT, results, data_dir=data_dir)
    assert result.returncode == 0, result.stderr
    header, rule, *rows = result.stdout.splitlines()
    columns = header.split()
    assert columns[0] == "run" and "lr" in columns and "n_epochs" in columns
    assert "dataset" not in columns and "batch_size" not in columns  # the same in every run
    assert columns[-5:] == ["epochs", "state", "best_valid_acc", "last_valid_acc", "training_hours"]
    by_run = {row.split()[0]: row.split() for row in rows}
    assert set(by_run) == {"grid/lr_0.1", "grid/lr_0.2", "short", "stopped"}
    assert by_run["grid/lr_0.2"][columns.index("epochs")] == "4/4"
    assert by_run["stopped"][columns.index("state")] == "stopped"
    assert by_run["stopped"][columns.index("epochs")].endswith("/3")
    assert by_run["grid/lr_0.1"][columns.index("lr")] == "0.1"  # config values unpadded, metrics 4 decimals
    assert "note: skipped broken" in result.stderr and "notes" not in result.stdout
    assert "Traceback" not in result.stderr


def test_report_sorts_and_writes_csv_and_markdown(results, data_dir, tmp_path):
    csv, markdown = tmp_path / "runs.csv", tmp_path / "runs.md"
    result = run_script(REPORT_SCRIPT, results, "--sort", "best_valid_acc", "--reverse", "--csv", csv,
                        "--markdown", markdown, data_dir=data_dir)
    assert result.returncode == 0, result.stderr
    import pandas as pd

    table = pd.read_csv(csv)
    scores = list(table["best_valid_acc"].dropna())
    assert scores == sorted(scores, reverse=True) and len(table) == 4
    lines = markdown.read_text().splitlines()
    assert lines[0].startswith("| run |") and lines[1].startswith("|---|") and len(lines) == 6
    bad = run_script(REPORT_SCRIPT, results, "--sort", "accuracy", data_dir=data_dir)
    assert bad.returncode == 2 and "cannot sort by 'accuracy'" in bad.stderr


def test_report_overlays_chosen_runs(results, data_dir, tmp_path):
    out = tmp_path / "overlay.png"
    result = run_script(REPORT_SCRIPT, results, "--plot", out, "--runs", "grid/lr_0.1,grid/lr_0.2", data_dir=data_dir)
    assert result.returncode == 0, result.stderr
    assert_real_picture(out)
    missing = run_script(REPORT_SCRIPT, results, "--plot", out, "--runs", "nope", data_dir=data_dir)
    assert missing.returncode == 2 and "no run named nope" in missing.stderr
    empty = run_script(REPORT_SCRIPT, tmp_path, data_dir=data_dir)
    assert empty.returncode == 0 and "no runs" in empty.stdout


def test_every_run_draws_its_curves(results):
    for run in ("grid/lr_0.1", "grid/lr_0.2", "short"):
        assert_real_picture(results / run / "curves.png")


def test_tensorboard_events_read_back(results):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(results / "grid" / "lr_0.2" / "tensorboard"))
    events.Reload()
    tags = events.Tags()["scalars"]
    for name in ("train_loss", "train_acc", "valid_loss", "valid_acc", "lr", "images_per_second"):
        assert f"epoch/{name}" in tags, name
    assert [e.step for e in events.Scalars("epoch/valid_acc")] == [15, 30, 45, 60]
    logged = load_main_loop(results / "grid" / "lr_0.2").log
    assert [e.value for e in events.Scalars("epoch/valid_acc")] == pytest.approx(list(logged["valid_acc"]))
    assert [e.step for e in events.Scalars("iteration/train_loss")] == [50]
    assert "iteration/lr" in tags


def tensorboard_steps(folder, tag):
    """Steps of `tag` as TensorBoard's own loader sees them (the one that honours purges)."""
    from tensorboard.backend.event_processing.plugin_event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder))
    events.Reload()
    return [e.step for e in events.Tensors(tag)]


def test_tensorboard_has_no_doubled_points_after_a_mid_epoch_resume(results, train_here, tmp_path):
    run = tmp_path / "stopped"
    shutil.copytree(results / "stopped", run)
    resumed = train_here(run, *RESUMABLE)
    assert resumed.returncode == 0, resumed.stderr
    assert tensorboard_steps(run / "tensorboard", "epoch/valid_acc") == [15, 30, 45]


def test_tensorboard_keeps_the_checkpoints_own_point_after_an_epoch_end_resume(train_here, tmp_path):
    run = tmp_path / "run"
    assert train_here(run, "--n_epochs=1").returncode == 0
    assert train_here(run, "--n_epochs=2").returncode == 0  # resumes at iteration 15, an epoch end
    assert tensorboard_steps(run / "tensorboard", "epoch/valid_acc") == [15, 30]


def test_evaluate_writes_per_class_accuracy_and_confusion_matrices(results, evaluate_here, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(results / "grid" / "lr_0.1", run)
    result = evaluate_here(run)
    assert result.returncode == 0, result.stderr
    saved = json.loads((run / "eval_test.json").read_text())
    for which in ("last", "best"):
        per_class = saved[f"{which}_per_class_acc"]
        assert list(per_class)[:2] == ["airplane", "automobile"] and len(per_class) == 10
        matrix = np.loadtxt(run / f"confusion_test_{which}.csv", delimiter=",", skiprows=1,
                            usecols=range(1, 11), dtype=int)
        assert matrix.sum() == saved["n_test"] == 100
        assert np.trace(matrix) / 100 == pytest.approx(saved[f"{which}_test_acc"])
        assert_real_picture(run / f"confusion_test_{which}.png")
    assert load_main_loop(run).best_model is not None


def test_analysis_example_runs_as_a_script(results, data_dir, tmp_path):
    out = tmp_path / "comparison.png"
    result = run_script(EXAMPLE, results, out, data_dir=data_dir)
    assert result.returncode == 0, result.stderr
    assert "best run: grid/" in result.stdout and "skipped broken" in result.stdout
    assert_real_picture(out)


def test_analysis_example_runs_cell_by_cell_as_in_a_notebook(results, monkeypatch, capsys):
    """In a notebook there is no __file__ and sys.argv is the kernel's: the cells must not depend on either."""
    monkeypatch.setenv("RESULTS_DIR", str(results))
    monkeypatch.setattr(sys, "argv", ["ipykernel_launcher", "-f", "kernel.json"])
    monkeypatch.chdir(REPO)
    cells = re.split(r"(?m)^(?=# %%)", EXAMPLE.read_text())
    assert len(cells) > 5
    namespace = {"__name__": "__main__"}
    for cell in cells:
        exec(compile(cell, str(EXAMPLE), "exec"), namespace)  # noqa: S102
    assert (results / "comparison.png").exists()
    assert "best run:" in capsys.readouterr().out


# --- seeds aggregated: report.py --group-seeds ------------------------------------------------------------


@pytest.fixture(scope="session")
def seeded(tmp_path_factory, data_dir):
    """sweep/lr=0.1-seed={1,2,3} and sweep/lr=0.2-seed={1,2}, finished; two lr=0.1 seeds evaluated."""
    root = tmp_path_factory.mktemp("seeded")
    base = apply_overrides(simple_cnn_configs.get("cifar10"), dict(w[2:].split("=", 1) for w in TINY))
    saved_data_dir = os.environ.get("DATA_DIR")
    os.environ["DATA_DIR"] = str(data_dir)
    try:
        for lr, seeds in ((0.1, (1, 2, 3)), (0.2, (1, 2))):
            for seed in seeds:
                path = root / "sweep" / f"lr={lr}-seed={seed}"
                assert run_main_loop({**base, "lr": lr, "seed": seed, "tensorboard": False}, path,
                                     build_simple_cnn) == 0
        for seed in (1, 2):
            result = run_script(REPO / "src" / "scripts" / "evaluate.py", root / "sweep" / f"lr=0.1-seed={seed}",
                                data_dir=data_dir)
            assert result.returncode == 0, result.stderr
    finally:
        if saved_data_dir is None:
            del os.environ["DATA_DIR"]
        else:
            os.environ["DATA_DIR"] = saved_data_dir
    return root / "sweep"


def test_group_seeds_aggregates_real_runs(seeded):
    from src.analysis import group_seeds

    runs = load_runs(seeded)
    grouped = group_seeds(runs)
    assert list(grouped["lr"]) == [0.1, 0.2] and list(grouped["n"]) == [3, 2] and list(grouped["evaluated"]) == [2, 0]
    first = runs[runs["lr"] == 0.1]
    assert grouped["best_valid_acc_mean"][0] == pytest.approx(first["best_valid_acc"].mean())
    assert grouped["best_valid_acc_std"][0] == pytest.approx(first["best_valid_acc"].std(ddof=1))
    tests = [json.loads((seeded / f"lr=0.1-seed={s}" / "eval_test.json").read_text())["best_test_acc"] for s in (1, 2)]
    assert grouped["best_test_acc_mean"][0] == pytest.approx(np.mean(tests))
    assert grouped["parameters"][0] == runs["parameters"][0] > 0


def test_report_groups_seeds_sorts_exports_and_plots_bands(seeded, data_dir, tmp_path):
    csv, markdown, plot = tmp_path / "g.csv", tmp_path / "g.md", tmp_path / "bands.png"
    result = run_script(REPORT_SCRIPT, seeded, "--group-seeds", "--sort", "best_valid_acc", "--reverse",
                        "--csv", csv, "--markdown", markdown, "--plot", plot, data_dir=data_dir)
    assert result.returncode == 0, result.stderr
    header, rule, *rows = result.stdout.splitlines()[:4]
    columns = header.split()
    assert columns[:4] == ["lr", "n", "finished", "evaluated"] and "best_test_acc" in columns
    assert all("±" in row for row in rows)
    import pandas as pd

    numbers = pd.read_csv(csv)
    means = list(numbers["best_valid_acc_mean"])
    assert means == sorted(means, reverse=True) and set(numbers["n"]) == {2, 3}
    assert [row.split()[0] for row in rows] == [str(lr) for lr in numbers["lr"]]  # shown in the order exported
    assert markdown.read_text().count("\n") == 4
    assert_real_picture(plot)
    chosen = run_script(REPORT_SCRIPT, seeded, "--group-seeds", "--plot", tmp_path / "one.png", "--runs",
                        "lr=0.2-seed=1,lr=0.2-seed=2", data_dir=data_dir)  # the table: all; the figure: lr=0.2
    assert chosen.returncode == 0 and len(chosen.stdout.splitlines()) == 2 + 2 + 1  # both groups, and "wrote"
    assert_real_picture(tmp_path / "one.png")
