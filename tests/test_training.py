"""End to end through the real command line, on tiny CIFAR-format data."""
import json
import os
import pickle
import signal
import subprocess

import pytest
import torch

from conftest import (
    EVALUATE_SCRIPT,
    RESUMABLE,
    TINY,
    TRAIN_SCRIPT,
    assert_identical,
    run_script,
    start_script,
    wait_for_mid_epoch_checkpoint,
)
from src.analysis import load_main_loop
from src.runs.checkpoints import list_checkpoints, load_tensors
from src.files import RunFolderLock

def test_two_epoch_run_fills_the_run_folder(train, tmp_path):
    run = tmp_path / "run"
    result = train(run)
    assert result.returncode == 0, result.stderr
    assert "finished 2 epochs" in result.stdout
    for name in ("config.json", "meta.json", "log.jsonl", "status.json", "best_model.pt", "stdout.log", "stderr.log"):
        assert (run / name).is_file(), name
    rows = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    assert [r["iteration"] for r in rows] == [15, 30]
    for row in rows:
        assert set(row) == {"epoch", "iteration", "train_loss", "train_acc", "valid_loss", "valid_acc", "lr",
                            "epoch_seconds", "images_per_second", "finished_at"}
        assert 0 <= row["train_acc"] <= 1 and 0 <= row["valid_acc"] <= 1 and row["images_per_second"] > 0
    status = json.loads((run / "status.json").read_text())
    assert status["finished"] and status["epochs_done"] == 2 and status["iterations_done"] == 30
    meta = json.loads((run / "meta.json").read_text())
    for key in ("command", "git_commit", "host", "python", "torch", "device", "start_time", "sessions"):
        assert key in meta, key
    assert "train_simple_CNN.py" in meta["command"]
    config = json.loads((run / "config.json").read_text())
    assert config["n_filters"] == 4 and config["dataset"] == "cifar10"
    assert "epoch 2/2" in (run / "stdout.log").read_text()
    assert len(list_checkpoints(run / "checkpoints")) == 2  # the two newest are kept

    again = train(run)
    assert again.returncode == 0
    assert "already finished" in again.stdout
    assert (run / "log.jsonl").read_text().count("\n") == 2


def test_training_learns_the_learnable_data(train_here, tmp_path):
    result = train_here(tmp_path / "run", "--n_epochs=8", "--n_filters=8")
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]
    assert rows[-1]["valid_acc"] > 0.25  # 10 classes: chance is 0.1


def test_kill_9_mid_epoch_then_rerun_is_bit_identical(reference_run, data_dir, tmp_path):
    run = tmp_path / "run"
    args = ["cifar10", run, *TINY, *RESUMABLE]
    process = start_script(TRAIN_SCRIPT, *args, data_dir=data_dir)
    killed_after = wait_for_mid_epoch_checkpoint(process, run, after_iteration=15)
    process.kill()
    process.wait()
    assert process.returncode == -signal.SIGKILL
    resumed = run_script(TRAIN_SCRIPT, *args, data_dir=data_dir)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from" in resumed.stdout
    assert killed_after < 45
    assert_identical(reference_run, run)


@pytest.mark.parametrize("signal_number", [signal.SIGTERM, signal.SIGINT])
def test_signal_checkpoints_then_exits_128_plus_n_and_resumes_exactly(reference_run, data_dir, tmp_path,
                                                                      signal_number):
    run = tmp_path / "run"
    args = ["cifar10", run, *TINY, *RESUMABLE]
    process = start_script(TRAIN_SCRIPT, *args, data_dir=data_dir)
    wait_for_mid_epoch_checkpoint(process, run)
    process.send_signal(signal_number)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 128 + signal_number, stderr
    assert "Traceback" not in stderr
    assert "rerun the same command to resume" in stderr
    status = json.loads((run / "status.json").read_text())
    assert not status["finished"]
    assert list_checkpoints(run / "checkpoints")[0].name == status["last_checkpoint"]
    resumed = run_script(TRAIN_SCRIPT, *args, data_dir=data_dir)
    assert resumed.returncode == 0, resumed.stderr
    assert_identical(reference_run, run)


def test_changed_config_is_refused_and_n_epochs_may_grow(train_here, tmp_path):
    run = tmp_path / "run"
    assert train_here(run).returncode == 0
    before = (run / "log.jsonl").read_text()
    refused = train_here(run, "--lr=0.2", "--seed=5")
    assert refused.returncode == 2
    assert refused.stderr.count("\n") == 1 and "Traceback" not in refused.stderr
    assert "lr: 0.05 -> 0.2" in refused.stderr and "seed: 1 -> 5" in refused.stderr
    assert (run / "log.jsonl").read_text() == before

    extended = train_here(run, "--n_epochs=3")
    assert extended.returncode == 0, extended.stderr
    rows = (run / "log.jsonl").read_text().splitlines()
    assert len(rows) == 3 and "\n".join(rows[:2]) + "\n" == before
    assert json.loads((run / "config.json").read_text())["n_epochs"] == 3
    lowered = train_here(run, "--n_epochs=1")
    assert lowered.returncode == 0 and "already finished" in lowered.stdout
    assert json.loads((run / "config.json").read_text())["n_epochs"] == 3  # what was trained, not the request


def test_a_second_process_on_the_run_folder_is_refused(train, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    lock = RunFolderLock(run).acquire()
    try:
        result = train(run)
    finally:
        lock.release()
    assert result.returncode == 1
    assert f"in use by process {os.getpid()}" in result.stderr
    assert result.stderr.count("\n") == 1
    assert train(run).returncode == 0  # free again once the holder lets go


def test_corrupt_newest_checkpoint_falls_back_to_the_previous_one(train_here, tmp_path):
    run = tmp_path / "run"
    assert train_here(run, "--checkpoint_every_n_batches=4").returncode == 0
    newest, previous = list_checkpoints(run / "checkpoints")
    newest.write_bytes(newest.read_bytes()[:1000])  # a copy cut short
    result = train_here(run, "--checkpoint_every_n_batches=4", "--n_epochs=3")
    assert result.returncode == 0, result.stderr
    assert f"{newest} is corrupt" in result.stdout
    assert f"resuming from {previous}" in result.stdout
    assert (run / "checkpoints" / (newest.name + ".corrupt")).exists()
    assert len((run / "log.jsonl").read_text().splitlines()) == 3


def test_no_whole_checkpoint_refuses_to_start_over(train_here, tmp_path):
    run = tmp_path / "run"
    assert train_here(run, "--checkpoint_every_n_batches=4").returncode == 0
    for path in list_checkpoints(run / "checkpoints"):
        path.write_bytes(b"garbage")
    result = train_here(run, "--checkpoint_every_n_batches=4", "--n_epochs=3")
    assert result.returncode == 1
    assert "no whole checkpoint" in result.stderr and result.stderr.count("\n") == 1
    assert len(list_checkpoints(run / "checkpoints")) == 2  # nothing was moved or deleted


def test_a_planted_pickle_never_runs(train_here, tmp_path):
    run = tmp_path / "run"
    assert train_here(run).returncode == 0
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    newest = list_checkpoints(run / "checkpoints")[0]
    newest.write_bytes(pickle.dumps({"model": Exploit()}))
    with pytest.raises(Exception, match="corrupt"):
        load_tensors(newest)
    load_main_loop(run)  # falls back to the previous checkpoint
    result = train_here(run, "--n_epochs=3")
    assert result.returncode == 0, result.stderr
    assert "is corrupt" in result.stdout
    assert not marker.exists()


def test_load_main_loop_and_evaluate(train_here, data_dir, tmp_path):
    run = tmp_path / "run"
    assert train_here(run).returncode == 0
    ml = load_main_loop(run)
    assert ml.config["n_filters"] == 4
    assert list(ml.log["epoch"]) == [1, 2] and "valid_acc" in ml.log.columns
    assert ml.status["epochs_done"] == 2 and ml.status["iterations_done"] == 30 and ml.status["finished"]
    assert not ml.model.training
    images = torch.randint(0, 256, (5, 3, 32, 32), dtype=torch.uint8)
    assert ml.model(images).shape == (5, 10)
    best = ml.best_model
    assert best is not None and not best.training

    result = run_script(EVALUATE_SCRIPT, run, data_dir=data_dir)
    assert result.returncode == 0, result.stderr
    saved = json.loads((run / "eval_test.json").read_text())
    assert saved["n_test"] == 100
    assert 0 <= saved["last_test_acc"] <= 1 and saved["last_test_loss"] > 0
    assert f"test accuracy {saved['last_test_acc']:.4f}" in result.stdout


def test_evaluate_refuses_unfinished_runs_unless_asked(train_here, evaluate_here, tmp_path):
    run = tmp_path / "run"
    assert train_here(run, "--n_epochs=1").returncode == 0
    (run / "status.json").write_text(json.dumps({**json.loads((run / "status.json").read_text()),
                                                  "finished": False}))
    refused = evaluate_here(run)
    assert refused.returncode == 2 and "unfinished" in refused.stderr
    allowed = evaluate_here(run, "--allow_unfinished")
    assert allowed.returncode == 0, allowed.stderr
    missing = evaluate_here(tmp_path / "nothing")
    assert missing.returncode == 2 and missing.stderr.count("\n") == 1


def test_cifar100_coarse_labels(train_here, tmp_path):
    run = tmp_path / "run"
    result = train_here(run, "--n_epochs=1", config="cifar100_coarse")
    assert result.returncode == 0, result.stderr
    ml = load_main_loop(run)
    assert ml.model(torch.zeros(2, 3, 32, 32, dtype=torch.uint8)).shape == (2, 20)


def test_corrupt_data_is_one_line_exit_1(tmp_path):
    (tmp_path / "cifar-10-python.tar.gz").write_bytes(b"not an archive")
    result = run_script(TRAIN_SCRIPT, "cifar10", tmp_path / "run", *TINY, data_dir=tmp_path)
    assert result.returncode == 1
    assert "cifar-10-python.tar.gz is corrupt" in result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr


def test_log_and_status_lost_after_the_last_checkpoint_are_rebuilt(train_here, tmp_path):
    """A kill between the final checkpoint and log.jsonl/status.json must not leave them stale for good."""
    run = tmp_path / "run"
    assert train_here(run).returncode == 0
    full_log = (run / "log.jsonl").read_text()
    (run / "log.jsonl").write_text(full_log.splitlines(keepends=True)[0])
    status = json.loads((run / "status.json").read_text())
    (run / "status.json").write_text(json.dumps({**status, "epochs_done": 1, "finished": False}))
    again = train_here(run)
    assert again.returncode == 0 and "already finished" in again.stdout
    assert (run / "log.jsonl").read_text() == full_log
    assert json.loads((run / "status.json").read_text())["finished"]


def test_evaluate_reports_a_corrupt_best_model_in_one_line(train_here, evaluate_here, tmp_path):
    run = tmp_path / "run"
    assert train_here(run, "--n_epochs=1").returncode == 0
    (run / "best_model.pt").write_bytes(b"\x80\x02garbage")
    result = evaluate_here(run)
    assert result.returncode == 1 and "best_model.pt is corrupt" in result.stderr
    assert result.stderr.count("\n") == 1
    assert evaluate_here(run, "--device=tpu").returncode == 2


def test_resuming_on_another_device_or_precision_warns(train_here, tmp_path):
    run = tmp_path / "run"
    assert train_here(run, "--n_epochs=1").returncode == 0
    meta = json.loads((run / "meta.json").read_text())
    meta["sessions"][-1]["precision"] = "as on another machine"
    (run / "meta.json").write_text(json.dumps(meta))
    resumed = train_here(run, "--n_epochs=2")
    assert resumed.returncode == 0
    assert "will not match an uninterrupted run bit for bit" in resumed.stdout
    assert len(json.loads((run / "meta.json").read_text())["sessions"]) == 2


# ------------------------------------------------------------------ per-epoch bookkeeping (issue 13)


def test_valid_every_validates_every_nth_epoch_and_the_last(train_here, tmp_path):
    """Unvalidated epochs log None (the EMA's columns too) and never become the best model; the last epoch is
    always validated; the run table still finds the best and last accuracy."""
    from src.analysis import load_runs

    run = tmp_path / "run"
    result = train_here(run, "--n_epochs=5", "--valid_every=2", "--ema=0.5")
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    validated = [row["epoch"] for row in rows if row["valid_acc"] is not None]
    assert validated == [2, 4, 5]
    assert [row["epoch"] for row in rows if row["ema_valid_acc"] is not None] == validated
    assert all(row["valid_loss"] is None for row in rows if row["epoch"] not in validated)
    status = json.loads((run / "status.json").read_text())
    assert status["finished"] and status["best_valid_acc"] == max(rows[e - 1]["ema_valid_acc"] for e in validated)
    assert "valid loss - acc -" in result.stdout
    table = load_runs(tmp_path)
    assert table["best_valid_acc"][0] == pytest.approx(max(rows[e - 1]["valid_acc"] for e in validated))
    assert table["last_valid_acc"][0] == pytest.approx(rows[-1]["valid_acc"])


def drawings(monkeypatch):
    """The number of log rows of every curves.png drawing, in order (the real drawing still happens)."""
    import src.runs.plots

    calls, real = [], src.runs.plots.plot_curves
    monkeypatch.setattr(src.runs.plots, "plot_curves", lambda log, path, title: (calls.append(len(log)),
                                                                            real(log, path, title)))
    return calls


def test_curves_are_drawn_at_the_first_epoch_then_at_most_every_n_seconds_and_at_the_end(train_here, tmp_path,
                                                                                          monkeypatch):
    calls = drawings(monkeypatch)
    assert train_here(tmp_path / "rare", "--n_epochs=4", "--plot_every_seconds=1e9").returncode == 0
    assert calls == [1, 4]  # the first epoch, then only the end
    assert (tmp_path / "rare" / "curves.png").stat().st_size > 10_000
    calls.clear()
    assert train_here(tmp_path / "often", "--n_epochs=4", "--plot_every_seconds=0").returncode == 0
    assert calls[0] == 1 and calls[-1] == 4 and calls == sorted(set(calls))  # every epoch whose turn was free
    calls.clear()  # when to draw may change on resume, like when to save: it changes nothing computed
    assert train_here(tmp_path / "rare", "--n_epochs=5", "--plot_every_seconds=0").returncode == 0
    assert calls == [5]


def test_a_drawing_that_cannot_be_written_stops_the_run_in_one_line(train_here, tmp_path, monkeypatch):
    """Drawn off the training thread, a full disk at curves.png is still one line, exit 1, before the next save."""
    import errno

    import src.runs.plots

    def full(log, path, title):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(src.runs.plots, "plot_curves", full)
    run = tmp_path / "run"
    result = train_here(run, "--checkpoint_every_n_batches=4")
    assert result.returncode == 1
    assert result.stderr == (f"error: cannot write {run / 'curves.png'} (No space left on device); training stopped, "
                             "the previous checkpoint is kept; free some space (or fix the folder) and rerun the "
                             "same command to resume\n")
    assert [int(p.stem.split("_")[1]) for p in list_checkpoints(run / "checkpoints")] == [15, 12]


def test_a_run_stopped_by_a_signal_draws_its_whole_log(data_dir, tmp_path):
    """Epoch 2 is not due for a drawing (plot_every_seconds=1e9); SIGTERM in epoch 3 draws both epochs."""
    from src.runs.plots import plot_curves
    import pandas as pd

    run = tmp_path / "run"
    process = start_script(TRAIN_SCRIPT, "cifar10", run, *TINY, *RESUMABLE, "--plot_every_seconds=1e9",
                           data_dir=data_dir)
    wait_for_mid_epoch_checkpoint(process, run, after_iteration=30)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 128 + signal.SIGTERM, stderr
    rows = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert len(rows) == 2
    expected = tmp_path / "expected.png"
    plot_curves(pd.DataFrame(rows), expected, title="run: learning curves")
    assert (run / "curves.png").read_bytes() == expected.read_bytes()


def test_fp16_the_device_cannot_run_is_refused_in_one_line_before_anything_is_written(train_here, tmp_path,
                                                                                       monkeypatch):
    import src.training.hardware

    def no_half(device, precision):
        raise RuntimeError("no fp16 kernels here")

    monkeypatch.setattr(src.training.hardware, "autocast", no_half)
    run = tmp_path / "run"
    result = train_here(run, "--precision=fp16")
    assert result.returncode == 1
    assert result.stderr == ("error: --precision=fp16 does not run on cpu (no fp16 kernels here); "
                             "use --precision=auto or fp32\n")
    assert not (run / "config.json").exists()


def test_fp16_under_torchrun_skips_overflowing_steps_on_every_rank_alike(data_dir, tmp_path):
    """DDP averages the scaled gradients before the scaler looks at them, so every rank skips the same steps:
    a run whose scale overflows again and again ends normally, its scaler in the checkpoint."""
    import sys

    from conftest import REPO, script_env
    from src.runs.checkpoints import save_tensors

    def torchrun(*args):
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                   str(TRAIN_SCRIPT), "cifar10", *map(str, args)]
        return subprocess.run(command, cwd=REPO, capture_output=True, text=True, env=script_env(data_dir),
                              timeout=300)

    run = tmp_path / "run"
    args = [run, *TINY, *RESUMABLE, "--precision=fp16", "--grad_clip=1.0"]
    first = torchrun(*args, "--n_epochs=1")
    assert first.returncode == 0, first.stderr[-2000:]
    newest = list_checkpoints(run / "checkpoints")[0]
    contents = load_tensors(newest)
    contents["scaler"].update(scale=2.0 ** 24, growth_interval=2)
    save_tensors(contents, newest, checksum=True)
    rest = torchrun(*args)
    assert rest.returncode == 0, rest.stderr[-2000:]
    final = load_tensors(list_checkpoints(run / "checkpoints")[0])
    assert final["scaler"]["scale"] < 2.0 ** 24 and len(final["progress"]["log"]) == 3
    assert all(torch.isfinite(value).all() for value in final["model"].values() if value.is_floating_point())
