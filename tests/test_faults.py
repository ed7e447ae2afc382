"""Faults a run meets on a shared cluster: kills at any instant, signals, a full disk, a diverging loss."""
import json
import random
import shutil
import signal
import time
from pathlib import Path

import pytest
import torch

from conftest import (
    RESUMABLE,
    TINY,
    TRAIN_SCRIPT,
    assert_identical,
    run_script,
    start_script,
    wait_for_mid_epoch_checkpoint,
)
from src.runs.checkpoints import checkpoint_iteration, list_checkpoints, load_tensors, save_tensors
from src.files import TMP_PREFIX

FAULTS = str(Path(__file__).parent / "faults")
N_KILLS = 12


def newest_iteration(run):
    paths = list_checkpoints(run / "checkpoints")
    return checkpoint_iteration(paths[0]) if paths else -1


def kill_again_and_again(args, data_dir, n_kills, rng):
    """Start the run and kill -9 it, `n_kills` times, at random instants after fresh progress, every third
    time inside a checkpoint write; -> (kills, kills while writing). Then finish it uninterrupted."""
    run = args[1]
    kills = kills_while_writing = 0
    while kills < n_kills:
        before = newest_iteration(run)
        process = start_script(TRAIN_SCRIPT, *args, data_dir=data_dir, PYTHONPATH=FAULTS, SLOW_FSYNC_SECONDS="0.02")
        deadline = time.monotonic() + 120
        while newest_iteration(run) <= before and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.002)
        if kills % 3 == 0:  # every third kill aims at a checkpoint write in progress (fsync is slowed)
            while process.poll() is None and time.monotonic() < deadline and not any(
                    p.name.startswith(TMP_PREFIX) for p in (run / "checkpoints").iterdir()):
                time.sleep(0.001)
        else:
            time.sleep(rng.uniform(0, 0.15))
        if process.poll() is not None:
            break  # finished before this kill
        writing = any(p.name.startswith(TMP_PREFIX) for p in (run / "checkpoints").iterdir())
        process.kill()
        process.wait()
        kills += 1
        kills_while_writing += writing
    final = run_script(TRAIN_SCRIPT, *args, data_dir=data_dir)
    assert final.returncode == 0, final.stderr
    return kills, kills_while_writing


def killed_equals_uninterrupted(overrides, data_dir, tmp_path, rng):
    """The TINY, RESUMABLE run with `overrides` trained once uninterrupted and once killed N_RECIPE_KILLS times
    anywhere (a checkpoint every 2 batches); both end bit for bit alike -> (the killed run, its arguments)."""
    reference = tmp_path / "reference"
    done = run_script(TRAIN_SCRIPT, "cifar10", reference, *TINY, *RESUMABLE, *overrides, data_dir=data_dir)
    assert done.returncode == 0, done.stderr
    run = tmp_path / "run"
    args = ["cifar10", run, *TINY, *RESUMABLE, *overrides, "--checkpoint_every_n_batches=2"]
    kills, _ = kill_again_and_again(args, data_dir, N_RECIPE_KILLS, rng)
    assert kills == N_RECIPE_KILLS, f"the run finished after only {kills} kills"
    assert_identical(reference, run)
    return run, args


def test_killed_at_random_instants_resumes_bit_identical(reference_run, data_dir, tmp_path):
    """Kill -9 again and again, at random instants after fresh progress, often inside a checkpoint write."""
    run = tmp_path / "run"
    args = ["cifar10", run, *TINY, *RESUMABLE, "--checkpoint_every_n_batches=2"]
    kills, kills_while_writing = kill_again_and_again(args, data_dir, N_KILLS, random.Random(20261125))
    assert kills == N_KILLS, f"the run finished after only {kills} kills"
    assert kills_while_writing >= N_KILLS // 3, f"only {kills_while_writing} kills landed inside a checkpoint write"
    assert_identical(reference_run, run)
    print(f"{kills} kills ({kills_while_writing} during a checkpoint write), final state bit-identical")


# Every recipe knob on (issue 11): EMA, cutout, mixup, label smoothing, gradient clipping, and a linear warmup
# of 5 iterations in front of a multistep schedule whose milestones (in iterations) fall mid-epoch; and hiverge's
# brightness and contrast jitter (issue 21).
RECIPE = ["--ema=0.9", "--cutout=8", "--mixup=1.0", "--label_smoothing=0.1", "--grad_clip=0.5", "--warmup=5",
          "--brightness=0.14", "--contrast=0.13",
          "--warmup_lr=0.005", "--schedule_unit=iterations", "--lr_schedule=multistep", "--lr_milestones=[20,37]"]
N_RECIPE_KILLS = 4


@pytest.fixture(scope="module")
def recipe_reference(tmp_path_factory, data_dir):
    path = tmp_path_factory.mktemp("recipe_reference") / "run"
    result = run_script(TRAIN_SCRIPT, "cifar10", path, *TINY, *RESUMABLE, *RECIPE, data_dir=data_dir)
    assert result.returncode == 0, result.stderr
    return path


def test_killed_with_every_recipe_knob_on_resumes_bit_identical(recipe_reference, data_dir, tmp_path):
    """The same kills with the stateful (EMA) and random (cutout, mixup) knobs on: weights, optimizer state, EMA,
    counters and log rows (EMA columns included) end bit for bit as in an uninterrupted run."""
    run = tmp_path / "run"
    args = ["cifar10", run, *TINY, *RESUMABLE, *RECIPE, "--checkpoint_every_n_batches=2"]
    kills, kills_while_writing = kill_again_and_again(args, data_dir, N_RECIPE_KILLS, random.Random(11))
    assert kills == N_RECIPE_KILLS, f"the run finished after only {kills} kills"
    assert kills_while_writing >= 1
    assert_identical(recipe_reference, run)
    a, b = (load_tensors(list_checkpoints(r / "checkpoints")[0]) for r in (recipe_reference, run))
    assert int(a["ema"]["n_averaged"]) == int(b["ema"]["n_averaged"]) == 45
    assert a["ema"]["model"].keys() == b["ema"]["model"].keys()
    for key, value in a["ema"]["model"].items():
        assert torch.equal(value, b["ema"]["model"][key]), key
    assert "ema_valid_acc" in a["progress"]["log"][-1]
    best_a, best_b = (load_tensors(r / "best_model.pt") for r in (recipe_reference, run))  # the EMA's, both
    assert all(torch.equal(value, best_b[key]) for key, value in best_a.items())


# Issue 13: fp16 (autocast + GradScaler) on the CPU, with the new keys at non-default values. After its first
# epoch the scaler's scale is set to 2**24 and its growth interval to 2 (in the checkpoint): the first ~7
# steps then overflow (inf gradients, skipped), and from then on the scale grows every 2 good steps and
# overflows again, so skipped steps land all over the run, next to checkpoints and kills.
FP16 = ["--precision=fp16", "--grad_clip=1.0", "--valid_every=3", "--plot_every_seconds=1e9", "--deterministic=true"]
OVERFLOWING_SCALE = 2.0 ** 24


@pytest.fixture(scope="module")
def fp16_start(tmp_path_factory, data_dir):
    """One fp16 epoch, then a scaler made to overflow, saved into its newest checkpoint."""
    path = tmp_path_factory.mktemp("fp16_start") / "run"
    result = run_script(TRAIN_SCRIPT, "cifar10", path, *TINY, *RESUMABLE, *FP16, "--n_epochs=1", data_dir=data_dir)
    assert result.returncode == 0, result.stderr
    newest = list_checkpoints(path / "checkpoints")[0]
    contents = load_tensors(newest)
    assert contents["scaler"]["scale"] == 2.0 ** 16  # GradScaler's start, no overflow yet in this tiny model
    contents["scaler"].update(scale=OVERFLOWING_SCALE, growth_interval=2)
    save_tensors(contents, newest, checksum=True)
    return path


@pytest.fixture(scope="module")
def fp16_reference(fp16_start, tmp_path_factory, data_dir):
    path = tmp_path_factory.mktemp("fp16_reference") / "run"
    shutil.copytree(fp16_start, path)
    result = run_script(TRAIN_SCRIPT, "cifar10", path, *TINY, *RESUMABLE, *FP16, data_dir=data_dir)
    assert result.returncode == 0, result.stderr
    return path


def test_fp16_with_skipped_steps_killed_anywhere_resumes_bit_identical(fp16_start, fp16_reference, data_dir,
                                                                        tmp_path):
    """kill -9 again and again through fp16 steps that the scaler skips: weights, momentum, the scaler's state
    and the log (epoch 2 unvalidated, valid_every=3) end bit for bit as in an uninterrupted run."""
    run = tmp_path / "run"
    shutil.copytree(fp16_start, run)
    args = ["cifar10", run, *TINY, *RESUMABLE, *FP16, "--checkpoint_every_n_batches=2"]
    kills, _ = kill_again_and_again(args, data_dir, N_RECIPE_KILLS, random.Random(13))
    assert kills == N_RECIPE_KILLS, f"the run finished after only {kills} kills"
    assert_identical(fp16_reference, run)
    a, b = (load_tensors(list_checkpoints(r / "checkpoints")[0]) for r in (fp16_reference, run))
    assert a["scaler"] == b["scaler"]
    assert a["scaler"]["scale"] < OVERFLOWING_SCALE  # only skipped steps lower the scale: some were skipped
    rows = a["progress"]["log"]
    assert [row["valid_acc"] is None for row in rows] == [False, True, False]  # epoch 1 was its session's last


@pytest.mark.skipif(not torch.cuda.is_available(), reason="deterministic=true is a promise about CUDA kernels")
def test_cuda_deterministic_run_killed_anywhere_resumes_bit_identical(data_dir, tmp_path):
    """On a GPU, deterministic=true (no cuDNN autotuning, deterministic algorithms) keeps the exact-resume
    contract: killed four times, the run ends bit for bit as an uninterrupted one."""
    killed_equals_uninterrupted(["--device=cuda", "--deterministic=true"], data_dir, tmp_path, random.Random(7))


@pytest.mark.parametrize("signal_number", [signal.SIGUSR1, signal.SIGUSR2])
def test_slurm_warning_signals_checkpoint_and_exit(data_dir, tmp_path, signal_number):
    run = tmp_path / "run"
    process = start_script(TRAIN_SCRIPT, "cifar10", run, *TINY, *RESUMABLE, data_dir=data_dir)
    stopped_after = wait_for_mid_epoch_checkpoint(process, run)
    process.send_signal(signal_number)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 128 + signal_number, stderr
    assert "Traceback" not in stderr
    assert newest_iteration(run) >= stopped_after


def test_second_ctrl_c_exits_at_once_without_damage(reference_run, data_dir, tmp_path):
    run = tmp_path / "run"
    args = ["cifar10", run, *TINY, *RESUMABLE]
    process = start_script(TRAIN_SCRIPT, *args, data_dir=data_dir, PYTHONPATH=FAULTS, SLOW_FSYNC_SECONDS="0.3")
    wait_for_mid_epoch_checkpoint(process, run)
    process.send_signal(signal.SIGINT)
    time.sleep(0.05)
    process.send_signal(signal.SIGINT)  # while the first one's checkpoint is being written (slow fsync)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130
    assert "exiting now" in stderr and "Traceback" not in stderr
    for path in list_checkpoints(run / "checkpoints"):
        load_tensors(path)  # every checkpoint left is whole
    resumed = run_script(TRAIN_SCRIPT, *args, data_dir=data_dir)
    assert resumed.returncode == 0, resumed.stderr
    assert_identical(reference_run, run)


def test_full_disk_stops_training_and_keeps_the_previous_checkpoint(data_dir, tmp_path):
    run = tmp_path / "run"
    args = ["cifar10", run, *TINY, "--checkpoint_every_n_batches=4"]
    # config.json, meta.json, then the cache is already there; the first checkpoint and its log fit, then ENOSPC
    result = run_script(TRAIN_SCRIPT, *args, data_dir=data_dir, PYTHONPATH=FAULTS, FAIL_FSYNC_AFTER="10")
    assert result.returncode == 1
    assert "No space left on device" in result.stderr and "previous checkpoint is kept" in result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    kept = list_checkpoints(run / "checkpoints")
    assert kept, "the checkpoint written before the disk filled up is gone"
    for path in kept:
        load_tensors(path)
    assert not [p for p in (run / "checkpoints").iterdir() if p.name.startswith(TMP_PREFIX)]
    resumed = run_script(TRAIN_SCRIPT, *args, data_dir=data_dir)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming from {kept[0]}" in resumed.stdout


def test_unwritable_save_path_is_one_line(data_dir, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    result = run_script(TRAIN_SCRIPT, "cifar10", blocker / "run", *TINY, data_dir=data_dir)
    assert result.returncode == 1
    assert "cannot use" in result.stderr and result.stderr.count("\n") == 1


def test_diverging_loss_stops_with_the_iteration_and_keeps_good_checkpoints(train_here, tmp_path):
    run = tmp_path / "run"
    assert train_here(run, "--n_epochs=1", "--checkpoint_every_n_batches=1").returncode == 0
    newest = list_checkpoints(run / "checkpoints")[0]
    contents = load_tensors(newest)
    for state in contents["optimizer"]["state"].values():  # momentum that throws the next step to infinity
        state["momentum_buffer"].fill_(3e38)
    save_tensors(contents, newest)
    result = train_here(run, "--n_epochs=2", "--checkpoint_every_n_batches=1")
    assert result.returncode == 1
    assert "NaN or infinite at iteration" in result.stderr and result.stderr.count("\n") == 1
    assert "Traceback" not in result.stderr
    bad = int(result.stderr.split("at iteration ")[1].split(";")[0])
    last_saved = checkpoint_iteration(list_checkpoints(run / "checkpoints")[0])
    assert 15 <= last_saved < bad <= 17  # the edited state diverges within two steps; nothing saved from then on
    assert f"last checkpoint: iteration {last_saved}" in result.stderr
    assert len((run / "log.jsonl").read_text().splitlines()) == 1


def test_weights_driven_to_infinity_are_never_saved(train_here, tmp_path):
    """The step's own loss is still finite when it throws the weights to infinity: the weights are checked too."""
    run = tmp_path / "run"
    assert train_here(run, "--n_epochs=1").returncode == 0
    newest = list_checkpoints(run / "checkpoints")[0]
    contents = load_tensors(newest)
    next(iter(contents["optimizer"]["state"].values()))["momentum_buffer"].fill_(float("inf"))
    save_tensors(contents, newest)
    result = train_here(run, "--n_epochs=2", "--checkpoint_every_n_batches=1")
    assert result.returncode == 1
    assert "the weights became NaN or infinite at iteration 16;" in result.stderr
    assert "last checkpoint: iteration 15" in result.stderr
    assert list_checkpoints(run / "checkpoints")[0] == newest


def test_time_based_checkpoints_land_mid_epoch(train_here, tmp_path):
    """checkpoint_every_seconds alone (no batch count) must checkpoint inside an epoch, not only at its end."""
    timed = tmp_path / "timed"
    assert train_here(timed, "--n_epochs=1", "--checkpoint_every_seconds=1e-9").returncode == 0
    assert [checkpoint_iteration(p) for p in list_checkpoints(timed / "checkpoints")] == [15, 14]
    untimed = tmp_path / "untimed"
    assert train_here(untimed, "--n_epochs=1").returncode == 0  # TINY turns the timer off
    assert [checkpoint_iteration(p) for p in list_checkpoints(untimed / "checkpoints")] == [15]


def test_an_iteration_budget_ending_mid_epoch_is_killed_anywhere_and_resumes_bit_identical(data_dir, tmp_path):
    """n_iterations=40 of 3 epochs of 15 (hiverge's 243 steps of 8 epochs of 32): the schedule ends at step 40,
    the third epoch is logged and saved at 10 of its 15 batches, the run is finished there; kills anywhere
    change nothing, and a rerun trains nothing."""
    budget = ["--n_iterations=40", "--lr_schedule=linear"]
    run, args = killed_equals_uninterrupted(budget, data_dir, tmp_path, random.Random(17))
    contents = load_tensors(list_checkpoints(run / "checkpoints")[0])
    rows = contents["progress"]["log"]
    assert [row["iteration"] for row in rows] == [15, 30, 40] and contents["trainer"]["iteration"] == 40
    lr = json.loads((run / "config.json").read_text())["lr"]
    assert rows[-1]["lr"] == pytest.approx(lr * (1 - 39 / 40))  # the last step's: the schedule ends at 40
    status = json.loads((run / "status.json").read_text())
    assert status["finished"] and status["iterations_done"] == 40
    again = run_script(TRAIN_SCRIPT, *args, data_dir=data_dir)
    assert again.returncode == 0 and "already finished" in again.stdout
