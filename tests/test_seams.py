"""The seams: configs that grow without orphaning run folders, and a model family, an optimizer and a
dataset added through their registries alone, then trained, resumed, evaluated and reported.

tests/data/run_v1_2c3368b is a run folder written by the code of commit 2c3368b (before the `model`,
`optimizer` and `adam_beta2` keys existed), on the data `legacy_data` writes, with LEGACY_ARGS and
OMP_NUM_THREADS=1; its curves.png and .lock were left out to keep it small. Its weights came from an
AVX-512 machine: the bit-identity test compares with weights the same old commit writes on the machine
that runs it (its tree from git history, in a temporary folder), since other CPU kernels round otherwise.
"""
import io
import json
import shutil
import subprocess
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from conftest import REPO, TRAIN_SCRIPT, run_script
from src.runs.checkpoints import list_checkpoints, load_tensors
from src.datasets.writer import write_cifar

LEGACY = Path(__file__).parent / "data" / "run_v1_2c3368b"
LEGACY_COMMIT = "2c3368b"  # the code that wrote LEGACY
LEGACY_ARGS = ["--n_layers=1", "--n_filters=2", "--dim_dense=4", "--batch_size=50", "--valid_size=50",
               "--n_epochs=2", "--tensorboard=false", "--checkpoint_every_seconds=0", "--precision=fp32",
               "--device=cpu"]
TIMING = ("epoch_seconds", "images_per_second", "finished_at")


@pytest.fixture(scope="module")
def legacy_data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("legacy_data")
    write_cifar("cifar10", folder, n_train=300, n_test=50, seed=5)
    return folder


@pytest.fixture
def legacy_run(tmp_path, legacy_data, monkeypatch):
    run = tmp_path / "legacy"
    shutil.copytree(LEGACY, run)
    monkeypatch.setenv("DATA_DIR", str(legacy_data))
    return run


@pytest.fixture(scope="module")
def old_code(tmp_path_factory):
    """The tree of LEGACY_COMMIT (src and configs), taken from git history into a temporary folder."""
    old_tree = tmp_path_factory.mktemp(f"code_{LEGACY_COMMIT}")
    archive = subprocess.run(["git", "archive", "--format=tar", LEGACY_COMMIT, "src", "configs"], cwd=REPO,
                             capture_output=True, timeout=120)
    assert archive.returncode == 0, f"commit {LEGACY_COMMIT} is needed from git history: {archive.stderr[-300:]!r}"
    with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
        tar.extractall(old_tree, filter="data")
    return old_tree


def train_old(old_code, run, *args, data_dir):
    result = run_script(old_code / "src" / "scripts" / "train_simple_CNN.py", "cifar10", run, *args,
                        data_dir=data_dir, cwd=old_code)
    assert result.returncode == 0, result.stderr
    return run


@pytest.fixture(scope="module")
def reference_here(old_code, legacy_data, tmp_path_factory):
    """The run LEGACY records, trained afresh on this machine by the code of LEGACY_COMMIT: the reference for
    bit-identity on whatever CPU runs the tests."""
    return train_old(old_code, tmp_path_factory.mktemp("reference") / "run", *LEGACY_ARGS, data_dir=legacy_data)


def rows(log_text):
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING} for line in log_text.splitlines()]


def test_a_run_folder_from_before_the_new_keys_resumes_and_extends(train_here, legacy_run):
    old_rows = rows((legacy_run / "log.jsonl").read_text())
    result = train_here(legacy_run, *LEGACY_ARGS, "--n_epochs=3")
    assert result.returncode == 0, result.stderr
    assert "resuming from" in result.stdout and "(epoch 2, iteration 10)" in result.stdout
    filled = [line for line in result.stdout.splitlines() if "predates the keys" in line]
    from configs.simple_cnn import simple_cnn_configs

    new_keys = [key for key in simple_cnn_configs.root if key not in json.loads((LEGACY / "config.json").read_text())]
    assert len(filled) == 1 and filled[0].split("predates the keys ")[1].startswith(", ".join(new_keys) + ":")
    config = json.loads((legacy_run / "config.json").read_text())
    assert (config["model"], config["optimizer"], config["adam_beta2"], config["n_epochs"]) == ("simple_cnn", "sgd",
                                                                                               0.999, 3)
    new_rows = rows((legacy_run / "log.jsonl").read_text())
    assert new_rows[:2] == old_rows and len(new_rows) == 3
    again = train_here(legacy_run, *LEGACY_ARGS, "--n_epochs=3")  # now complete: no line, a quick no-op
    assert again.returncode == 0 and "predates" not in again.stdout and "already finished" in again.stdout


def test_the_default_path_is_bit_identical_to_the_code_before_the_seams(reference_here, legacy_data, tmp_path):
    """The same command, run from scratch by this code, ends with the weights, momentum and log the old code
    saves on this machine (one thread, each as a separate process like the original)."""
    fresh = tmp_path / "fresh"
    result = run_script(TRAIN_SCRIPT, "cifar10", fresh, *LEGACY_ARGS, data_dir=legacy_data)
    assert result.returncode == 0, result.stderr
    old = load_tensors(reference_here / "checkpoints" / "checkpoint_10.pt")
    new = load_tensors(list_checkpoints(fresh / "checkpoints")[0])
    assert old["model"].keys() == new["model"].keys()
    for key in old["model"]:
        assert torch.equal(old["model"][key], new["model"][key]), key
    for a, b in zip(old["optimizer"]["state"].values(), new["optimizer"]["state"].values(), strict=True):
        assert torch.equal(a["momentum_buffer"], b["momentum_buffer"])
    assert rows((fresh / "log.jsonl").read_text()) == rows((reference_here / "log.jsonl").read_text())


def test_an_old_folder_resumes_in_the_memory_format_it_was_trained_in(old_code, legacy_data, tmp_path):
    """The old code trained bf16 in channels_last (fp32 in NCHW on a CPU): a bf16 folder it started, resumed by
    this code, goes on in channels_last and ends bit for bit as the old code's uninterrupted run."""
    args = [*LEGACY_ARGS, "--precision=bf16", "--lr_schedule=constant"]  # constant: n_epochs may grow exactly
    whole = train_old(old_code, tmp_path / "old_whole", *args, data_dir=legacy_data)
    resumed = train_old(old_code, tmp_path / "old_then_new", *args, "--n_epochs=1", data_dir=legacy_data)
    result = run_script(TRAIN_SCRIPT, "cifar10", resumed, *args, data_dir=legacy_data)
    assert result.returncode == 0, result.stderr
    session = json.loads((resumed / "meta.json").read_text())["sessions"][-1]
    assert (session["precision"], session["memory_format"], session["kernels_chosen_by"]) == (
        "bf16", "channels_last", "recorded")
    old, new = (load_tensors(list_checkpoints(run / "checkpoints")[0]) for run in (whole, resumed))
    for key in old["model"]:
        assert torch.equal(old["model"][key], new["model"][key]), key
    assert rows((resumed / "log.jsonl").read_text()) == rows((whole / "log.jsonl").read_text())


def test_the_committed_old_folder_is_what_that_code_writes_apart_from_the_cpu_s_rounding(reference_here):
    """LEGACY's log has the same rows as the reference made here but for the last digits of the floats the
    CPU's kernels round (AVX-512 there, maybe AVX2 here): the resume tests start from a faithful folder."""
    here, committed = rows((reference_here / "log.jsonl").read_text()), rows((LEGACY / "log.jsonl").read_text())
    assert [row.keys() for row in here] == [row.keys() for row in committed]
    for a, b in zip(here, committed, strict=True):
        for key in a:
            assert a[key] == pytest.approx(b[key], rel=1e-3, abs=1e-3), key


def test_a_saved_key_this_code_does_not_know_is_refused(train_here, legacy_run):
    config = json.loads((legacy_run / "config.json").read_text())
    (legacy_run / "config.json").write_text(json.dumps({**config, "old_knob": 1}))
    before = {p.name: p.read_bytes() for p in legacy_run.rglob("*") if p.is_file() and p.suffix != ".log"}
    result = train_here(legacy_run, *LEGACY_ARGS, "--n_epochs=3")
    assert result.returncode == 2 and "old_knob" in result.stderr and result.stderr.count("\n") == 1
    after = {p.name: p.read_bytes() for p in legacy_run.rglob("*") if p.is_file() and p.suffix != ".log"}
    assert after.keys() - {".lock"} == before.keys() and all(after[k] == before[k] for k in before)


def test_notebooks_report_and_sweeps_read_the_old_folder_with_the_new_keys(legacy_run):
    from src.analysis import load_main_loop, load_runs
    from src.sweep import is_finished

    loaded = load_main_loop(legacy_run)
    assert loaded.config["model"] == "simple_cnn" and loaded.config["optimizer"] == "sgd"
    assert loaded.model is not None and loaded.best_model is not None and loaded.status["finished"]
    table = load_runs(legacy_run.parent)
    assert list(table["run"]) == ["legacy"] and table["optimizer"][0] == "sgd" and table["state"][0] == "finished"
    assert is_finished(legacy_run, loaded.config)  # a rerun sweep skips it, as it did before the keys existed


# ------------------------------------------------------------------ a family, an optimizer, a dataset by name


class Toy(nn.Module):
    """A linear classifier whose standardisation is not its first child: found by type, not position."""

    def __init__(self, n_outputs, width):
        super().__init__()
        from src.models import Standardize

        self.head = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, width), nn.ReLU(), nn.Linear(width, n_outputs))
        self.inputs = Standardize()

    def forward(self, x):
        return self.head(self.inputs(x))


def toy_images(n, seed):
    """Three classes told apart by their mean colour."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 3, n)
    images = rng.normal(60 + 60 * labels[:, None, None, None], 30, (n, 3, 32, 32)).clip(0, 255).astype(np.uint8)
    return images, labels.astype(np.int64)


@pytest.fixture
def toy_registries(monkeypatch):
    from configs.training import TRAINING_ROOT, training_problems
    from src import config as config_module
    from src import data
    from src import models
    from src.training import optim
    from src.config import ConfigRegistry, register_family
    from src.data import Dataset, n_classes, register_dataset

    monkeypatch.setitem(models.MODELS, "toy", lambda c: Toy(n_classes(c["dataset"]), c["width"]))
    monkeypatch.setattr(optim, "OPTIMIZERS", {**optim.OPTIMIZERS,
                                              "plain": lambda c, p: torch.optim.SGD(p, lr=c["lr"])})
    monkeypatch.setattr(data, "DATASETS", dict(data.DATASETS))
    monkeypatch.setattr(config_module, "FAMILIES", dict(config_module.FAMILIES))
    register_dataset(Dataset(name="toy3", n_classes={"fine": 3}, n_train=150,
                             load=lambda data_dir, mode: (toy_images(150, 1), toy_images(60, 2)),
                             class_names=lambda data_dir, mode: ["dark", "mid", "light"]))
    registry = register_family(ConfigRegistry("toy", training_problems))
    registry.set_root({"model": "toy", "width": 8, **TRAINING_ROOT})
    registry.derive("toy3", dataset="toy3", optimizer="plain", lr_schedule="constant", lr=0.1, valid_size=30,
                    batch_size=30, n_epochs=2, checkpoint_every_seconds=0.0, tensorboard=False)
    return registry


def test_a_family_an_optimizer_and_a_dataset_added_by_name_train_resume_evaluate_and_report(
        toy_registries, tmp_path, capsys, evaluate_here):
    from src.analysis import load_main_loop, load_runs
    from src.cli import dispatch_with_overrides
    from src.main_loop import run_main_loop

    def train(*overrides):
        capsys.readouterr()
        with pytest.raises(SystemExit) as exit_info:
            dispatch_with_overrides(lambda config, path: run_main_loop(config, path), toy_registries,
                                    ["toy3", str(tmp_path / "runs" / "toy"), *overrides])
        return exit_info.value.code, capsys.readouterr()

    code, printed = train()
    assert code == 0, printed.err
    run = tmp_path / "runs" / "toy"
    assert json.loads((run / "config.json").read_text())["optimizer"] == "plain"
    code, printed = train("--n_epochs=4")  # raised: resumes from the end of epoch 2
    assert code == 0 and "resuming from" in printed.out and "epoch 4/4" in printed.out
    loaded = load_main_loop(run)
    assert isinstance(loaded.model, Toy) and len(loaded.log) == 4
    assert loaded.log["valid_acc"].iloc[-1] > 0.5  # it learns (chance: 1/3)
    result = evaluate_here(run)
    assert result.returncode == 0, result.stderr
    saved = json.loads((run / "eval_test.json").read_text())
    assert saved["n_test"] == 60 and set(saved["last_per_class_acc"]) == {"dark", "mid", "light"}
    table = load_runs(tmp_path / "runs")
    assert table["model"][0] == "toy" and table["state"][0] == "finished" and table["epochs_done"][0] == 4
