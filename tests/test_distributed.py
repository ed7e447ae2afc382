"""Data-parallel training with torchrun on CPU (gloo, 2 processes): equal gradients, exact resume, one writer."""
import json
import os
import signal
import subprocess
import sys

import pytest
import torch

from conftest import REPO, RESUMABLE, TINY, TRAIN_SCRIPT, assert_identical, script_env, wait_for_mid_epoch_checkpoint

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
DDP_ARGS = ["cifar10", *TINY, *RESUMABLE]


def torchrun(data_dir, *args, wait=True):
    command = [*TORCHRUN, *map(str, args)]
    env = script_env(data_dir)
    if wait:
        return subprocess.run(command, cwd=REPO, capture_output=True, text=True, env=env, timeout=300)
    return subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)


def kill_tree(pid):
    """SIGKILL a process and all its descendants, as a lost node would."""
    def descendants(parent):
        try:
            children = [int(c) for c in open(f"/proc/{parent}/task/{parent}/children").read().split()]
        except OSError:
            return []
        return children + [d for c in children for d in descendants(c)]

    for victim in [pid, *descendants(pid)]:
        try:
            os.kill(victim, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.fixture(scope="session")
def ddp_reference(tmp_path_factory, data_dir):
    run = tmp_path_factory.mktemp("ddp") / "run"
    result = torchrun(data_dir, TRAIN_SCRIPT, DDP_ARGS[0], run, *DDP_ARGS[1:])
    assert result.returncode == 0, result.stderr[-2000:]
    return run


def test_first_step_gradients_equal_a_single_process_on_the_same_global_batch(data_dir, tmp_path):
    script = REPO / "tests" / "ddp_first_step.py"
    alone = subprocess.run([sys.executable, script, tmp_path / "alone.pt"], cwd=REPO, capture_output=True,
                           text=True, env=script_env(data_dir), timeout=120)
    assert alone.returncode == 0, alone.stderr
    shared = torchrun(data_dir, script, tmp_path / "ddp.pt")
    assert shared.returncode == 0, shared.stderr[-2000:]
    single, parallel = torch.load(tmp_path / "alone.pt"), torch.load(tmp_path / "ddp.pt")
    assert single.keys() == parallel.keys()
    for name in single:
        assert single[name].abs().sum() > 0, name
        torch.testing.assert_close(parallel[name], single[name], rtol=1e-5, atol=1e-7, msg=name)


def test_no_ddp_wrapper_outlives_the_process_group(data_dir, tmp_path):
    result = torchrun(data_dir, REPO / "tests" / "ddp_teardown.py", tmp_path / "run", tmp_path / "alive")
    assert result.returncode == 0, result.stderr[-2000:]
    assert [(tmp_path / f"alive.{rank}").read_text() for rank in (0, 1)] == ["0 0", "0 0"]


def test_ddp_trains_with_one_writer(ddp_reference):
    rows = [json.loads(line) for line in (ddp_reference / "log.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [15, 30, 45]  # 15 global batches of 32 per epoch, as alone
    printed = (ddp_reference / "stdout.log").read_text()
    assert printed.count("epoch 1/3") == 1 and printed.count("finished 3 epochs") == 1
    assert json.loads((ddp_reference / "meta.json").read_text())["processes"] == 2
    assert json.loads((ddp_reference / "status.json").read_text())["finished"]


def test_ddp_killed_mid_epoch_resumes_bit_identically(ddp_reference, data_dir, tmp_path):
    run = tmp_path / "run"
    process = torchrun(data_dir, TRAIN_SCRIPT, DDP_ARGS[0], run, *DDP_ARGS[1:], wait=False)
    wait_for_mid_epoch_checkpoint(process, run, after_iteration=15)
    kill_tree(process.pid)  # torchrun and both ranks (which it starts in sessions of their own), at once
    process.wait()
    resumed = torchrun(data_dir, TRAIN_SCRIPT, DDP_ARGS[0], run, *DDP_ARGS[1:])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming from" in (run / "stdout.log").read_text()
    assert_identical(ddp_reference, run)


def test_batch_that_does_not_split_evenly_is_refused(data_dir, tmp_path):
    result = torchrun(data_dir, TRAIN_SCRIPT, "cifar10", tmp_path / "run", *TINY, "--batch_size=33")
    assert result.returncode != 0
    assert "must divide evenly among 2 processes" in result.stderr


@pytest.mark.parametrize("saved_ranks, now", [(2, 2), (2, 1), (1, 3)])
def test_running_sums_resume_under_another_number_of_processes(saved_ranks, now):
    from src.main_loop import Progress

    sums = [torch.tensor([1.5 * (r + 1), 10.0 * (r + 1), 32.0], dtype=torch.float64) for r in range(saved_ranks)]
    state = {"log": [], "best_valid_acc": None, "rank_sums": sums, "seconds_before": 0.0}
    ranks = [Progress(torch.device("cpu"), rank, now) for rank in range(now)]
    for progress in ranks:
        progress.load_state_dict(state)
    total = sum(p.sums() for p in ranks)
    assert torch.equal(total, sum(sums))  # nothing of the epoch so far is lost or counted twice
    if saved_ranks == now:
        assert torch.equal(ranks[1].sums(), sums[1])  # same world size: each rank gets its own, exactly
