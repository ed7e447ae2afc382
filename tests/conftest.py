"""Shared fixtures: tiny CIFAR-format data in the official layout, and a way to run the scripts."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from src.cifar_writer import write_cifar

REPO = Path(__file__).resolve().parents[1]
TRAIN_SCRIPT = REPO / "src" / "scripts" / "train_simple_CNN.py"
EVALUATE_SCRIPT = REPO / "src" / "scripts" / "evaluate.py"
# A model and data small enough that a run takes about a second: 500 training images, 15 batches.
TINY = ["--n_layers=2", "--n_filters=4", "--dim_dense=16", "--batch_size=32", "--valid_size=100",
        "--n_epochs=2", "--checkpoint_every_seconds=0"]


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    """CIFAR-10 and CIFAR-100 archives (.tar.gz, Python-2 pickles) with 600 training and 100 test images."""
    folder = tmp_path_factory.mktemp("cifar")
    write_cifar("cifar10", folder, n_train=600, n_test=100, seed=1)
    write_cifar("cifar100", folder, n_train=600, n_test=100, seed=2)
    return folder


def script_env(data_dir, **extra):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "CIFAR_BASE_URL")}
    env.update(DATA_DIR=str(data_dir), OMP_NUM_THREADS="1", **extra)
    return env


def run_script(script, *args, data_dir, cwd=REPO, **extra_env):
    """Run a script as a user would (no PYTHONPATH); returns the CompletedProcess."""
    return subprocess.run([sys.executable, str(script), *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, env=script_env(data_dir, **extra_env), timeout=300)


def start_script(script, *args, data_dir, **extra_env):
    return subprocess.Popen([sys.executable, str(script), *map(str, args)], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=script_env(data_dir, **extra_env))


@pytest.fixture
def train(data_dir):
    """train(save_path, *overrides, config="cifar10") -> CompletedProcess, with the TINY settings first."""

    def run(save_path, *overrides, config="cifar10", **extra_env):
        return run_script(TRAIN_SCRIPT, config, save_path, *TINY, *overrides, data_dir=data_dir, **extra_env)

    return run
