"""The run folder's promises under misuse: it never restarts over a run's results, never adopts a folder of
other files, takes a corrected command after a failed start, outlives its terminal, and a rank-0 failure
under torchrun ends every rank at once."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import REPO, TINY, TRAIN_SCRIPT, run_script, script_env, start_script, wait_for_mid_epoch_checkpoint
from src.runs.checkpoints import list_checkpoints
from src.datasets.writer import write_cifar


def folder_bytes(run):
    """Every file under `run` (but the lock and the copies of the output) -> its bytes."""
    skip = {".lock", "stdout.log", "stderr.log"}
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()
            and p.name not in skip}


@pytest.mark.parametrize("how", ["deleted", "emptied"])
def test_results_without_checkpoints_are_refused_and_untouched(train_here, tmp_path, how):
    run = tmp_path / "run"
    assert train_here(run, "--n_epochs=1").returncode == 0
    for path in list_checkpoints(run / "checkpoints"):
        path.unlink()
    if how == "deleted":
        (run / "checkpoints").rmdir()
    before = folder_bytes(run)
    result = train_here(run, "--n_epochs=2")
    assert result.returncode == 1, result.stdout
    assert "no checkpoint" in result.stderr and "never restarts by itself" in result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert folder_bytes(run) == before  # log.jsonl, status.json, best_model.pt, config.json: all as they were


def test_a_failed_start_does_not_lock_the_folder_to_its_config(train_here, tmp_path):
    run = tmp_path / "run"
    failed = train_here(run, "--device=cuda")  # no GPU here
    assert failed.returncode == 1 and "no CUDA GPU" in failed.stderr
    assert not (run / "config.json").exists()
    corrected = train_here(run, "--device=cpu", "--n_epochs=1")
    assert corrected.returncode == 0, corrected.stderr
    assert json.loads((run / "config.json").read_text())["device"] == "cpu"


def test_a_folder_with_a_config_but_no_work_takes_the_new_config(train_here, tmp_path):
    """A folder left by an older version (config.json written before the checks) is not locked either."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"device": "cuda"}))
    result = train_here(run, "--n_epochs=1")
    assert result.returncode == 0, result.stderr
    assert json.loads((run / "config.json").read_text())["device"] == "auto"


def test_a_started_run_still_refuses_another_config(train_here, tmp_path):
    run = tmp_path / "run"
    assert train_here(run, "--n_epochs=1").returncode == 0
    result = train_here(run, "--n_epochs=1", "--lr=0.2")
    assert result.returncode == 2 and "different config" in result.stderr


def test_empty_save_path_is_refused_and_the_current_folder_untouched(train_here, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    stray = tmp_path / ".tmp-keep.me"
    stray.write_text("someone's file")
    result = train_here("")
    assert result.returncode == 2 and "SAVE_PATH is empty" in result.stderr
    assert stray.exists() and sorted(p.name for p in tmp_path.iterdir()) == [".tmp-keep.me"]


def test_a_folder_of_other_files_is_not_adopted(train_here, tmp_path):
    folder = tmp_path / "papers"
    folder.mkdir()
    (folder / "draft.tex").write_text("\\section{}")
    (folder / ".tmp-notes").write_text("mine")
    result = train_here(folder)
    assert result.returncode == 2 and "not a run's (draft.tex)" in result.stderr
    assert sorted(p.name for p in folder.iterdir()) == [".tmp-notes", "draft.tex"]


@pytest.mark.parametrize("status, meta", [
    ("[]", "[]"),
    ('{"epochs_done": "many"}', '{"sessions": "x"}'),
    ('{"epochs_done": null, "finished": 3}', '{"sessions": [1, "a", null]}'),
    ("not json", '{"device": 1}'),
])
def test_mistyped_status_and_meta_are_rebuilt_not_a_traceback(train_here, tmp_path, status, meta):
    run = tmp_path / "run"
    assert train_here(run, "--n_epochs=1").returncode == 0
    (run / "status.json").write_text(status)
    (run / "meta.json").write_text(meta)
    result = train_here(run, "--n_epochs=2")
    assert result.returncode == 0, result.stderr
    assert json.loads((run / "status.json").read_text())["epochs_done"] == 2
    assert len(json.loads((run / "meta.json").read_text())["sessions"]) == 1


def test_sighup_checkpoints_and_exits_129(data_dir, tmp_path):
    run = tmp_path / "run"
    # SIGHUP at its default in the run, whatever the suite inherited: under `nohup make test` the run would
    # rightly keep ignoring it (the next test), and this one would fail for the way it was started.
    process = subprocess.Popen(
        [sys.executable, str(TRAIN_SCRIPT), "cifar10", str(run), *TINY, "--n_epochs=4",
         "--checkpoint_every_n_batches=4"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=script_env(data_dir),
        preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_DFL))
    wait_for_mid_epoch_checkpoint(process, run)
    process.send_signal(signal.SIGHUP)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 129, stderr
    assert "SIGHUP" in stderr and "Traceback" not in stderr
    stopped_at = json.loads((run / "status.json").read_text())["iterations_done"]
    assert stopped_at < 60 and list_checkpoints(run / "checkpoints")[0].name == f"checkpoint_{stopped_at}.pt"


def test_under_nohup_sighup_is_still_ignored(data_dir, tmp_path):
    run = tmp_path / "run"
    process = subprocess.Popen(
        [sys.executable, str(TRAIN_SCRIPT), "cifar10", str(run), *TINY, "--checkpoint_every_n_batches=4"],
        cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=script_env(data_dir),
        preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_IGN))
    wait_for_mid_epoch_checkpoint(process, run)
    process.send_signal(signal.SIGHUP)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 0, stderr


def test_a_closed_stdout_stops_the_printing_not_the_training(data_dir, tmp_path):
    """`train ... | head -1`: the reader leaves after one line; the run trains on and stdout.log keeps it all."""
    run = tmp_path / "run"
    process = start_script(TRAIN_SCRIPT, "cifar10", run, *TINY, "--n_epochs=3", data_dir=data_dir)
    first = process.stdout.readline()
    process.stdout.close()
    stderr = process.stderr.read()
    assert process.wait(timeout=120) == 0, stderr
    assert "Traceback" not in stderr and "Broken pipe" not in stderr and "BrokenPipe" not in stderr
    printed = (run / "stdout.log").read_text()
    assert first and first in printed and "epoch 3/3" in printed and "finished 3 epochs" in printed


def test_world_size_without_torchrun_is_one_line(data_dir, tmp_path):
    result = run_script(TRAIN_SCRIPT, "cifar10", tmp_path / "run", *TINY, data_dir=data_dir, WORLD_SIZE="2")
    assert result.returncode == 2
    assert "WORLD_SIZE=2 is set but" in result.stderr and result.stderr.count("\n") == 1
    assert not (tmp_path / "run").exists()


def test_a_rank_0_failure_under_torchrun_ends_every_rank_at_once(tmp_path):
    """A corrupt archive is read by rank 0 alone (it builds the cache): the other rank must not wait for it."""
    data = tmp_path / "data"
    archive = write_cifar("cifar10", data, n_train=100, n_test=10)
    archive.write_bytes(archive.read_bytes()[:1000])
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               str(TRAIN_SCRIPT), "cifar10", str(tmp_path / "run"), *TINY]
    started = time.monotonic()
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, env=script_env(data), timeout=120)
    assert time.monotonic() - started < 60, "the ranks waited for each other"
    assert result.returncode == 1, result.stderr[-2000:]
    assert result.stderr.count("is corrupt or truncated") == 1, result.stderr[-2000:]
    assert f'File "{REPO / "src"}' not in result.stderr  # no traceback from the ranks (torchrun prints its own)
    assert not os.path.exists(tmp_path / "run" / "config.json")
