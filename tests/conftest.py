"""Shared fixtures: tiny CIFAR-format data in the official layout, and a way to run the scripts."""
import contextlib
import functools
import io
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from src.runs.checkpoints import list_checkpoints, load_tensors
from src.datasets.writer import write_cifar
from src.data import load_cifar

REPO = Path(__file__).resolve().parents[1]
TRAIN_SCRIPT = REPO / "src" / "scripts" / "train_simple_CNN.py"
EVALUATE_SCRIPT = REPO / "src" / "scripts" / "evaluate.py"
# A model and data small enough that a run takes about a second: 500 training images, 15 batches.
TINY = ["--n_layers=2", "--n_filters=4", "--dim_dense=16", "--batch_size=32", "--valid_size=100",
        "--n_epochs=2", "--checkpoint_every_seconds=0"]


# Tests that train, evaluate or start processes are end-to-end and marked `slow`; `make test-fast` runs the
# rest (config, optim, schedules, stream, data, models, extensions on a tiny engine) in seconds.
SLOW_FIXTURES = {"data_dir", "train", "train_here", "evaluate_here", "reference_run", "ddp_reference", "results",
                 "finished", "damaged", "saved_run", "small_disk", "legacy_run", "toy_registries"}
# Modules that are end to end throughout (training, signals, torchrun, sweeps, the benchmark).
SLOW_MODULES = {"test_layout", "test_training", "test_faults", "test_distributed", "test_sweep", "test_bench",
                "test_run_folder_safety", "test_reporting", "test_seams", "test_slurm"}


def pytest_collection_modifyitems(items):
    for item in items:
        if SLOW_FIXTURES & set(item.fixturenames) or item.module.__name__ in SLOW_MODULES:
            item.add_marker(pytest.mark.slow)


@functools.cache
def slurm_missing():
    """None when a Slurm cluster answers on this machine (a node idle, mixed or allocated), else why not."""
    try:
        done = subprocess.run(["sinfo", "--noheader", "--format=%T"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"no Slurm here ({e.__class__.__name__}: sinfo)"
    states = done.stdout.split()
    # idle, mixed or allocated with no suffix (etc/local_slurm.sh's `usable`: * not responding, ~ powered off,
    # # powering up, % powering down, ! / @ / ^ pending reboot or power change)
    if done.returncode != 0 or not any(s in ("idle", "mixed", "allocated", "completing") for s in states):
        return f"no Slurm node up (sinfo: {(done.stderr.strip() or ' '.join(states) or 'nothing')[:200]})"
    return None


def pytest_runtest_setup(item):
    """Tests marked `slurm` need a running cluster: skipped without one, except on CI (CI=true), where .ci/run
    starts one, so that a missing cluster fails there instead of passing unnoticed."""
    if item.get_closest_marker("slurm") and (missing := slurm_missing()):
        text = f"{missing}; start one with `sudo bash etc/local_slurm.sh up`"
        if os.environ.get("CI", "").lower() not in ("", "0", "false"):
            pytest.fail(f"CI must run the Slurm tests: {text}", pytrace=False)
        pytest.skip(text)


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    """CIFAR-10 and CIFAR-100 archives (.tar.gz, Python-2 pickles) with 600 training and 100 test images."""
    folder = tmp_path_factory.mktemp("cifar")
    write_cifar("cifar10", folder, n_train=600, n_test=100, seed=1)
    write_cifar("cifar100", folder, n_train=600, n_test=100, seed=2)
    # Decoded and cached once here, so that no test's run is the first to build the cache: the build's
    # one-line warning (these archives are not the official files) and its fsyncs belong to no test.
    with contextlib.redirect_stderr(io.StringIO()):
        load_cifar("cifar10", folder)
        load_cifar("cifar100", folder)
    return folder


def script_env(data_dir, **extra):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "CIFAR_BASE_URL")}
    env.update(DATA_DIR=str(data_dir), OMP_NUM_THREADS="1", **extra)
    return env


def run_script(script, *args, data_dir, cwd=REPO, **extra_env):
    """Run a script as a user would (no PYTHONPATH); returns the CompletedProcess."""
    return subprocess.run([sys.executable, str(script), *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, env=script_env(data_dir, **extra_env), timeout=300)


def wait_until_catching(process, signal_number, timeout=120):
    """Wait until `process` has its own handler for `signal_number` (the kernel's SigCgt mask in /proc), i.e.
    its script is running and has set its signals; True, or False once it has exited. A fixed sleep in its
    place fails on a slow or loaded machine, where the interpreter may still be starting when it ends."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        try:
            fields = dict(line.split(":", 1) for line in Path(f"/proc/{process.pid}/status").read_text().splitlines())
        except (OSError, ValueError):
            return process.poll() is None
        if int(fields["SigCgt"].strip(), 16) >> (signal_number - 1) & 1:
            return True
        time.sleep(0.005)
    return process.poll() is None


def start_script(script, *args, data_dir, **extra_env):
    return subprocess.Popen([sys.executable, str(script), *map(str, args)], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=script_env(data_dir, **extra_env))


@pytest.fixture
def train_here(data_dir, monkeypatch, capsys):
    """Like `train`, but in this process (no start-up cost): -> (exit code, stdout, stderr).

    For tests of behaviour, not of the command line as a separate process; those use `train`.
    """
    from configs.simple_cnn import simple_cnn_configs
    from src.cli import dispatch_with_overrides
    from src.scripts.train_simple_CNN import train

    monkeypatch.setenv("DATA_DIR", str(data_dir))

    def run(save_path, *overrides, config="cifar10"):
        capsys.readouterr()
        with pytest.raises(SystemExit) as exit_info:
            dispatch_with_overrides(train, simple_cnn_configs, [config, str(save_path), *TINY, *overrides])
        out, err = capsys.readouterr()
        return subprocess.CompletedProcess([], exit_info.value.code, out, err)

    return run


def in_process(main, capsys):
    """A script's `main`, dispatched in this process: run(*args) -> CompletedProcess(returncode, stdout, stderr)."""
    from src.cli import dispatch

    def run(*args):
        capsys.readouterr()
        with pytest.raises(SystemExit) as exit_info:
            dispatch(main, [str(a) for a in args])
        out, err = capsys.readouterr()
        return subprocess.CompletedProcess([], exit_info.value.code, out, err)

    return run


def one_line_error(excinfo, *needles):
    """The message of `excinfo`: one line, naming each of `needles` (typically a path)."""
    message = str(excinfo.value)
    assert "\n" not in message and "\r" not in message, f"multi-line error: {message!r}"
    for needle in needles:
        assert str(needle) in message, f"{needle!r} not named in {message!r}"
    return message


@pytest.fixture
def evaluate_here(data_dir, monkeypatch, capsys):
    """evaluate.py's main in this process: -> CompletedProcess(returncode, stdout, stderr)."""
    from src.scripts.evaluate import main

    monkeypatch.setenv("DATA_DIR", str(data_dir))
    return in_process(main, capsys)


@pytest.fixture
def train(data_dir):
    """train(save_path, *overrides, config="cifar10") -> CompletedProcess, with the TINY settings first."""

    def run(save_path, *overrides, config="cifar10", **extra_env):
        return run_script(TRAIN_SCRIPT, config, save_path, *TINY, *overrides, data_dir=data_dir, **extra_env)

    return run


TIMING = ("epoch_seconds", "images_per_second", "finished_at")
# Dropout on, so that exact resume also needs the per-iteration re-seeding; checkpoints every 4 batches
# (15 batches per epoch) land mid-epoch.
RESUMABLE = ["--n_epochs=3", "--dropout=0.5", "--checkpoint_every_n_batches=4", "--n_filters=8"]


def final_state(run_dir):
    """What must match bit for bit: weights, optimizer state, counters, log rows (minus timings)."""
    contents = load_tensors(list_checkpoints(run_dir / "checkpoints")[0])
    rows = [{k: v for k, v in row.items() if k not in TIMING} for row in contents["progress"]["log"]]
    return contents, rows


def assert_identical(run_a, run_b):
    a, rows_a = final_state(run_a)
    b, rows_b = final_state(run_b)
    assert rows_a == rows_b
    assert a["trainer"] == b["trainer"]
    assert a["model"].keys() == b["model"].keys()
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    for state_a, state_b in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values(), strict=True):
        assert torch.equal(state_a["momentum_buffer"], state_b["momentum_buffer"])
    assert (run_a / "log.jsonl").read_text().count("\n") == (run_b / "log.jsonl").read_text().count("\n")


@pytest.fixture(scope="session")
def reference_run(tmp_path_factory, data_dir):
    """An uninterrupted run with the RESUMABLE settings, to compare interrupted ones with."""
    path = tmp_path_factory.mktemp("reference") / "run"
    result = run_script(TRAIN_SCRIPT, "cifar10", path, *TINY, *RESUMABLE, data_dir=data_dir)
    assert result.returncode == 0, result.stderr
    return path


def wait_for_mid_epoch_checkpoint(process, run_dir, after_iteration=0, timeout=120):
    """Block until a checkpoint beyond `after_iteration` that is not at an epoch end exists."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for path in list_checkpoints(run_dir / "checkpoints"):
            iteration = int(path.stem.split("_")[1])
            if iteration > after_iteration and iteration % 15:
                return iteration
        assert process.poll() is None, "the run ended before it could be interrupted"
        time.sleep(0.002)
    raise AssertionError("no checkpoint appeared")


def kill_mid_epoch(script, config, run_dir, *args, data_dir):
    """Start `script CONFIG RUN_DIR ARGS`, SIGKILL it right after a mid-epoch checkpoint, as a crash would."""
    import signal

    process = start_script(script, config, run_dir, *args, data_dir=data_dir)
    wait_for_mid_epoch_checkpoint(process, run_dir)
    process.kill()
    process.wait()
    assert process.returncode == -signal.SIGKILL
