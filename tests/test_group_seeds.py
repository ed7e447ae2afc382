"""group_seeds and the grouped table on a hand-made run table (what load_runs returns), without training."""
import math

import numpy as np
import pandas as pd
import pytest

from src.analysis import group_seeds
from src.analysis.table import (
    as_markdown, as_text, build_table, group_labels, grouped_numbers, grouped_table, grouped_text,
)


def run_row(run, lr, seed, best, last, hours=0.5, state="finished", test=None, milestones=(10, 20)):
    row = {"run": run, "model": "simple_cnn", "lr": lr, "seed": seed, "n_epochs": 30, "lr_milestones": list(milestones),
           "state": state, "epochs_done": 30, "best_valid_acc": best, "last_valid_acc": last, "last_train_loss": 0.1,
           "training_hours": hours, "parameters": 620586, "macs_per_image": 10848768}
    if test is not None:
        row.update(best_test_acc=test, best_test_top5=0.99, best_test_ece=0.02, last_test_acc=test - 0.01)
    return row


@pytest.fixture
def runs():
    return pd.DataFrame([
        run_row("lr=0.1-seed=1", 0.1, 1, 0.90, 0.89, test=0.88),
        run_row("lr=0.1-seed=2", 0.1, 2, 0.92, 0.90, test=0.90),
        run_row("lr=0.1-seed=3", 0.1, 3, 0.91, 0.88, state="stopped"),
        run_row("lr=0.2-seed=1", 0.2, 1, 0.80, 0.80, hours=1.0),
        run_row("lr=0.2-seed=2", 0.2, 2, 0.84, 0.82, hours=2.0),
    ])


def test_one_row_per_configuration_without_its_seed(runs):
    grouped = group_seeds(runs)
    assert list(grouped["lr"]) == [0.1, 0.2] and "seed" not in grouped.columns
    assert list(grouped["n"]) == [3, 2] and list(grouped["finished"]) == [2, 2]
    assert list(grouped["evaluated"]) == [2, 0]
    assert grouped["seeds"][0] == [1, 2, 3] and grouped["runs"][1] == ["lr=0.2-seed=1", "lr=0.2-seed=2"]
    assert grouped["best_valid_acc_mean"][0] == pytest.approx(0.91)
    assert grouped["best_valid_acc_std"][0] == pytest.approx(np.std([0.90, 0.92, 0.91], ddof=1))
    assert grouped["last_valid_acc_mean"][1] == pytest.approx(0.81)
    assert grouped["training_hours_mean"][1] == pytest.approx(1.5)
    # the test metrics evaluate.py saved, over the runs that have them
    assert grouped["best_test_acc_mean"][0] == pytest.approx(0.89)
    assert grouped["best_test_acc_std"][0] == pytest.approx(np.std([0.88, 0.90], ddof=1))
    assert grouped["last_test_acc_mean"][0] == pytest.approx(0.88)
    assert grouped["best_test_acc_mean"].isna()[1]
    assert list(grouped["parameters"]) == [620586, 620586] and grouped["lr_milestones"][0] == [10, 20]


def test_keys_that_change_nothing_computed_do_not_split_a_group(runs):
    runs["tensorboard"] = [True, False, True, True, True]
    runs["checkpoint_every_seconds"] = [300.0, 0.0, 300.0, 300.0, 300.0]
    grouped = group_seeds(runs)
    assert list(grouped["n"]) == [3, 2] and "tensorboard" not in grouped.columns
    runs["n_epochs"] = [30, 60, 30, 30, 30]  # trained longer: another configuration
    assert list(group_seeds(runs)["n"]) == [2, 1, 2]


def test_lists_in_configs_and_keys_a_run_lacks_group_by_value(runs):
    runs.loc[len(runs)] = run_row("other", 0.1, 4, 0.5, 0.5, milestones=(5,))
    runs["label_smoothing"] = [0.0] * (len(runs) - 1) + [math.nan]  # a key one run's config lacks
    grouped = group_seeds(runs)
    assert list(grouped["n"]) == [3, 2, 1]
    assert grouped["lr_milestones"][2] == [5]


def test_a_single_run_has_a_mean_and_no_std():
    grouped = group_seeds(pd.DataFrame([run_row("only", 0.1, 1, 0.9, 0.8)]))
    assert grouped["best_valid_acc_mean"][0] == 0.9 and grouped["best_valid_acc_std"].isna()[0]
    assert "0.9000 ±" not in as_text(grouped_table(grouped)) and "0.9000" in as_text(grouped_table(grouped))


def test_the_grouped_table_shows_mean_plus_minus_std(runs):
    table = grouped_table(group_seeds(runs))
    assert list(table.columns) == ["lr", "n", "finished", "evaluated", "parameters", "MACs", "best_valid_acc",
                                   "last_valid_acc", "best_test_acc", "best_test_top5", "best_test_ece",
                                   "training_hours"]
    text = as_text(table)
    header, rule, first, second = text.splitlines()
    assert "0.9100 ± 0.0100" in first and "620,586" in first and "10.8M" in first
    assert first.split()[:4] == ["0.1", "3", "2", "2"]
    assert "-" in second.split()  # no test results for lr=0.2
    assert grouped_text(runs) == text  # what a sweep prints
    markdown = as_markdown(table).splitlines()
    assert markdown[0].startswith("| lr | n |") and len(markdown) == 4
    assert group_labels(group_seeds(runs)) == ["lr=0.1", "lr=0.2"]


def test_the_grouped_csv_keeps_the_numbers(runs):
    numbers = grouped_numbers(group_seeds(runs))
    assert {"best_valid_acc_mean", "best_valid_acc_std", "best_test_ece_mean", "n", "runs"} <= set(numbers.columns)
    assert numbers["runs"][1] == "lr=0.2-seed=1 lr=0.2-seed=2" and numbers["seeds"][0] == "1 2 3"
    assert "model" not in numbers.columns  # the same everywhere


def test_an_empty_table_and_the_run_table_columns(runs):
    assert group_seeds(pd.DataFrame()).empty
    table = build_table(runs)
    assert list(table.columns[-5:]) == ["epochs", "state", "best_valid_acc", "last_valid_acc", "training_hours"]
    assert {"parameters", "MACs", "best_test_acc", "seed"} <= set(table.columns)
    assert "last_test_acc" not in table.columns  # the run table shows the best model's; load_runs has every one


def test_an_old_run_folder_has_no_size_and_a_damaged_eval_file_is_named(tmp_path):
    import json
    import shutil
    from pathlib import Path

    from src.analysis import load_runs

    legacy = Path(__file__).parent / "data" / "run_v1_2c3368b"
    shutil.copytree(legacy, tmp_path / "old")
    runs = load_runs(tmp_path)
    assert runs["parameters"][0] is None and runs["macs_per_image"][0] is None  # started before they were recorded
    assert "parameters" not in build_table(runs).columns
    (tmp_path / "old" / "eval_test.json").write_text(json.dumps({"best_test_acc": 0.5, "best_test_top5": "high"}))
    assert load_runs(tmp_path)["best_test_acc"][0] == 0.5  # numbers only; the rest is not a table's
    (tmp_path / "old" / "eval_test.json").write_text("{broken")
    skipped = load_runs(tmp_path).attrs["skipped"]
    assert skipped[0][0] == "old" and "eval_test.json" in skipped[0][1]
