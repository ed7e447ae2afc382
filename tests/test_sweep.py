"""Sweeps: grid expansion, local execution N at a time, rerun after a kill, preemption and requeue, Slurm jobs."""
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import REPO, RESUMABLE, TINY, assert_identical, script_env, wait_for_mid_epoch_checkpoint
from configs.simple_cnn import simple_cnn_configs
from src.errors import UsageError
from src.sweep import TrainingJob, expand_grid, plan_sweep
from src.sweep.slurm import slurm_parameters

SWEEP_SCRIPT = REPO / "src" / "scripts" / "sweep.py"
ROOT = simple_cnn_configs.root
# TINY and RESUMABLE with n_filters swept: the n_filters=8 point is the session's reference run.
GRID_ARGS = [w for w in TINY + RESUMABLE if not w.startswith("--n_filters")] + ["--n_filters=8,4"]


def sweep(data_dir, *args, wait=True, **extra_env):
    command = [sys.executable, str(SWEEP_SCRIPT), *map(str, args)]
    env = script_env(data_dir, **extra_env)
    if wait:
        return subprocess.run(command, cwd=REPO, capture_output=True, text=True, env=env, timeout=300)
    return subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env, start_new_session=True)


def test_grid_expands_every_combination_typed_by_the_root():
    grid = expand_grid({"n_filters": "8,16", "lr": "0.1,0.05", "augment": "false"}, ROOT, seeds=2)
    assert len(grid) == 8
    assert grid[0] == {"n_filters": 8, "lr": 0.1, "augment": False, "seed": 1}
    assert {type(p["lr"]) for p in grid} == {float}
    assert expand_grid({"n_layers": "2"}, ROOT) == [{"n_layers": 2}]
    with pytest.raises(UsageError, match="did you mean --n_filters"):
        expand_grid({"n_filter": "8,16"}, ROOT)
    with pytest.raises(UsageError, match="expected int"):
        expand_grid({"n_filters": "8,x"}, ROOT)
    with pytest.raises(UsageError, match="not both"):
        expand_grid({"seed": "1,2"}, ROOT, seeds=2)


def test_each_point_gets_a_folder_named_from_what_varies(tmp_path):
    runs = plan_sweep("cifar10", tmp_path, {"n_filters": "8,16", "lr": "0.1", "batch_norm": "true,false"}, ROOT)
    names = [path.name for path, _, _ in runs]
    assert names == ["n_filters=8-batch_norm=true", "n_filters=8-batch_norm=false",
                     "n_filters=16-batch_norm=true", "n_filters=16-batch_norm=false"]
    assert runs[0][1] == ["--n_filters=8", "--lr=0.1", "--batch_norm=true"]
    assert runs[0][2] == {**ROOT, "n_filters": 8, "lr": 0.1, "batch_norm": True}
    with pytest.raises(UsageError, match="share a folder"):
        plan_sweep("cifar10", tmp_path, {"n_filters": "8,8"}, ROOT)


def test_a_point_is_skipped_only_when_finished_with_the_same_config(tmp_path):
    import json

    from src.sweep import is_finished

    config = {**ROOT, "n_epochs": 2}
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "status.json").write_text(json.dumps({"finished": True}))
    assert is_finished(tmp_path, config)
    assert not is_finished(tmp_path, {**config, "n_epochs": 4})  # raised: the runner trains further
    assert not is_finished(tmp_path, {**config, "dropout": 0.3})  # changed: the runner says why it refuses
    (tmp_path / "status.json").write_text(json.dumps({"finished": False}))
    assert not is_finished(tmp_path, config)


def test_local_sweep_runs_two_at_a_time_and_a_rerun_skips_finished_runs(data_dir, tmp_path):
    sweep_dir = tmp_path / "grid"
    args = ["cifar10", sweep_dir, *TINY, "--n_filters=4,8", "--lr=0.1,0.05", "--n_epochs=1", "--max_parallel=2"]
    first = sweep(data_dir, *args)
    assert first.returncode == 0, first.stderr
    names = sorted(p.name for p in sweep_dir.iterdir() if not p.name.startswith(".") and p.is_dir())
    assert names == ["n_filters=4-lr=0.05", "n_filters=4-lr=0.1", "n_filters=8-lr=0.05", "n_filters=8-lr=0.1"]
    assert first.stdout.count("started ") == 4
    table = first.stdout[first.stdout.index("run "):]
    assert table.count("finished") == 4 and "lr" in table.splitlines()[0]
    assert "seeds aggregated" not in first.stdout  # no seeds in this grid: nothing to aggregate
    again = sweep(data_dir, *args)
    assert again.returncode == 0, again.stderr
    plan = [line for line in again.stdout.splitlines() if str(sweep_dir) in line]
    assert len(plan) == 4 and all(line.startswith("finished") for line in plan)
    assert "started " not in again.stdout


def test_a_sweep_with_seeds_ends_with_the_grouped_table(data_dir, tmp_path):
    sweep_dir = tmp_path / "seeds"
    result = sweep(data_dir, "cifar10", sweep_dir, *TINY, "--n_filters=4", "--lr=0.1,0.05", "--n_epochs=1",
                   "--seeds=2", "--max_parallel=2")
    assert result.returncode == 0, result.stderr
    grouped = result.stdout[result.stdout.index("seeds aggregated"):].splitlines()[1:]
    header, rows = grouped[0].split(), [line for line in grouped[2:] if line.strip()]
    assert header[:2] == ["lr", "n"] and "best_valid_acc" in header and "seed" not in header
    assert len(rows) == 2 and all(" 2 " in row and "±" in row for row in rows)  # two seeds per learning rate


def test_sweep_killed_midway_resumes_where_it_stopped(reference_run, data_dir, tmp_path):
    sweep_dir = tmp_path / "grid"
    args = ["cifar10", sweep_dir, *GRID_ARGS, "--max_parallel=1"]
    process = sweep(data_dir, *args, wait=False)
    wait_for_mid_epoch_checkpoint(process, sweep_dir / "n_filters=8")
    os.killpg(process.pid, signal.SIGKILL)  # the sweep, its submitit job and the run, as a lost node would
    process.wait()
    assert not (sweep_dir / "n_filters=4").exists() or not list((sweep_dir / "n_filters=4").glob("status.json"))
    rerun = sweep(data_dir, *args)
    assert rerun.returncode == 0, rerun.stderr
    assert "resuming from" in (sweep_dir / "n_filters=8" / "stdout.log").read_text()
    assert_identical(reference_run, sweep_dir / "n_filters=8")
    assert (sweep_dir / "n_filters=4" / "status.json").exists()


def test_preemption_checkpoints_requeues_and_resumes_exactly(reference_run, data_dir, tmp_path, monkeypatch):
    """Under submitit's own local executor, the warning signal must lead to checkpoint, requeue, exact resume."""
    import submitit

    for key, value in script_env(data_dir).items():
        monkeypatch.setenv(key, value)
    run = tmp_path / "run"
    executor = submitit.LocalExecutor(folder=tmp_path / "submitit")
    executor.update_parameters(timeout_min=10)
    job = executor.submit(TrainingJob("cifar10", run, TINY + RESUMABLE))
    deadline = time.monotonic() + 120
    while not (run / "checkpoints").is_dir() or not list((run / "checkpoints").glob("checkpoint_*.pt")):
        assert time.monotonic() < deadline and not job.done()
        time.sleep(0.01)
    # What Slurm's --signal=USR2@N (and submitit's local controller, near its time-out) does: the warning
    # signal to the job's task process, where submitit's handler calls TrainingJob.checkpoint().
    controller = job._process.pid
    task = int(open(f"/proc/{controller}/task/{controller}/children").read().split()[0])
    os.kill(task, signal.SIGUSR2)
    while not job.done():
        assert time.monotonic() < deadline + 120
        time.sleep(0.1)
    assert job.result() == str(run)
    printed = (run / "stderr.log").read_text()
    assert "stopped at iteration" in printed  # the run checkpointed on the signal, then exited
    assert "resuming from" in (run / "stdout.log").read_text()
    assert_identical(reference_run, run)


def test_slurm_job_array_parameters(tmp_path):
    from submitit.slurm.slurm import _make_sbatch_string

    parameters = slurm_parameters("grid", partition="gpu", time_min=240, gpus=1, cpus=8, mem_gb=32,
                                  array_parallelism=3)
    assert parameters["slurm_partition"] == "gpu" and parameters["gpus_per_node"] == 1
    assert parameters["timeout_min"] == 240 and parameters["slurm_array_parallelism"] == 3
    sbatch = _make_sbatch_string(
        command="python job.py", folder=tmp_path, job_name="grid", partition="gpu", time=240, gpus_per_node=1,
        cpus_per_task=8, mem="32GB", ntasks_per_node=1, nodes=1, signal_delay_s=parameters["slurm_signal_delay_s"],
        array_parallelism=3, map_count=4, additional_parameters=parameters["slurm_additional_parameters"],
        setup=parameters["slurm_setup"])
    for line in ("#SBATCH --partition=gpu", "#SBATCH --time=240", "#SBATCH --gpus-per-node=1",
                 "#SBATCH --cpus-per-task=8", "#SBATCH --mem=32GB", "#SBATCH --array=0-3%3",
                 "#SBATCH --signal=USR2@120", "#SBATCH --requeue", '    trap "kill -USR2 $pid" USR2'):
        assert line in sbatch, line
    assert sbatch.index("srun() {") < sbatch.index("\nsrun ")  # the batch shell passes a USR2 on to the job
    assert "gpus_per_node" not in slurm_parameters("cpu-only")
    import src.sweep

    assert src.sweep.slurm_parameters is slurm_parameters  # where it was imported from before src.sweep.slurm


def test_the_job_passes_the_warning_on_and_asks_to_be_requeued(tmp_path):
    """The Slurm path without Slurm: checkpoint() forwards SIGUSR2 to the run and returns its requeue."""
    job = TrainingJob("cifar10", tmp_path / "run", ["--n_epochs=2"])
    ready = tmp_path / "ready"
    fake_run = [sys.executable, "-c", "import pathlib,signal,sys,time\n"
                "signal.signal(signal.SIGUSR2, lambda *a: sys.exit(140))\n"
                f"pathlib.Path({str(ready)!r}).touch()\ntime.sleep(60)"]
    job.command = lambda: fake_run
    job.start()
    while not ready.exists():
        time.sleep(0.01)
    requeued = job.checkpoint()
    assert job._process.returncode == 140
    assert requeued.function.arguments == job.arguments and requeued.function._process is None


def test_bad_sweep_usage_is_one_line(data_dir, tmp_path):
    dry = sweep(data_dir, "cifar10", tmp_path / "grid", "--seed=5", "--lr=0.1,0.2", "--dry_run")
    assert dry.returncode == 0 and dry.stdout.count("--seed=5") == 2  # a config key, not --seeds abbreviated
    for args in (["cifar10", tmp_path, "--n_filter=4,8"], ["cifar10", tmp_path, "--backend=cloud"],
                 ["nope", tmp_path, "--lr=0.1"], ["cifar10", tmp_path, "stray"]):
        result = sweep(data_dir, *args)
        assert result.returncode == 2, (args, result.stderr)
        assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr


def test_a_slurm_job_that_did_not_finish_its_run_reads_as_its_reason(tmp_path, monkeypatch):
    """Slurm's one line (time limit, scancel, node failure), else the job's RunFailed, else the exception of its
    traceback, else Slurm's final state; never a log path."""
    from src.sweep import slurm as sweep_slurm

    monkeypatch.setattr(sweep_slurm, "final_state", lambda job_id: "OUT_OF_MEMORY")
    folder = tmp_path / ".submitit"
    (folder / "7_1").mkdir(parents=True)
    err = folder / "7_1" / "7_1_0_log.err"
    err.write_text("epoch 1/3\nslurmstepd: error: *** JOB 8 ON vm CANCELLED AT 2026-12-02T08:29:26 DUE TO TIME "
                   "LIMIT ***\n")
    assert sweep_slurm.job_error(folder, "7_1", False) == "Slurm: JOB 8 ON vm CANCELLED AT 2026-12-02T08:29:26 DUE " \
                                                         "TO TIME LIMIT; rerun the sweep to resume it"
    assert sweep_slurm.job_error(folder, "7_1", True) is None  # its run folder says finished: that decides
    err.write_text("error: an old one\nsubmitit ERROR Submitted job triggered an exception\nTraceback (most "
                   "recent call last):\n  File \"x.py\", line 1\nsrc.sweep.RunFailed: the reason\n")
    assert sweep_slurm.job_error(folder, "7_1", False) == "the reason"
    err.write_text("Traceback (most recent call last):\n  File \"x.py\", line 1\n    import src\n"
                   "ModuleNotFoundError: No module named 'src'\nsubmitit WARNING bye\n")
    assert sweep_slurm.job_error(folder, "7_1", False) == "ModuleNotFoundError: No module named 'src'"
    err.write_text("epoch 1/3\n")
    assert sweep_slurm.job_error(folder, "7_1", False) == "its job ended in Slurm's state OUT_OF_MEMORY without " \
                                                         "finishing the run; rerun the sweep to resume it"


class Hostile:
    """A pickle that creates `marker` when it is loaded: what a file planted in a sweep folder could do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def test_a_rerun_slurm_sweep_decides_from_the_run_folders_never_from_a_planted_result_pickle(tmp_path,
                                                                                            monkeypatch):
    """Two points Slurm had running, each with a hostile result pickle where submitit writes its result:
    the one whose run folder is finished succeeded, the other failed with its stderr's reason; nothing loaded."""
    import json
    import pickle

    from src.sweep import slurm as sweep_slurm
    from src.sweep import is_finished

    sweep_dir, marker = tmp_path / "grid", tmp_path / "pwned"
    done, failed = sweep_dir / "n_filters=4", sweep_dir / "n_filters=8"
    (sweep_dir / ".submitit").mkdir(parents=True)
    (sweep_dir / ".submitit" / "array_7.json").write_text(json.dumps({"7_0": str(done), "7_1": str(failed)}))
    for job_id in ("7_0", "7_1"):
        (sweep_dir / ".submitit" / job_id).mkdir()
        (sweep_dir / ".submitit" / job_id / f"{job_id}_0_result.pkl").write_bytes(pickle.dumps(Hostile(marker)))
    (sweep_dir / ".submitit" / "7_1" / "7_1_0_log.err").write_text("error: the run's own reason\n")
    config = {**ROOT, "n_filters": 4}
    done.mkdir()
    (done / "config.json").write_text(json.dumps(config))
    (done / "status.json").write_text(json.dumps({"finished": True}))
    answers = iter([["7_0|RUNNING", "7_1|PENDING"], ["7_0|RUNNING"]])  # the rerun's look, then the sweep's waits
    monkeypatch.setattr(sweep_slurm, "squeue", lambda *args: next(answers, []))
    monkeypatch.setattr(sweep_slurm, "final_state", lambda job_id: "COMPLETED")
    monkeypatch.setattr(sweep_slurm, "POLL_SECONDS", (0.01, 0.01))
    jobs = [TrainingJob("cifar10", path, []) for path in (done, failed)]
    expected = {str(done): config, str(failed): {**ROOT, "n_filters": 8}}
    said = []
    outcome = sweep_slurm.run_slurm(jobs, None, sweep_dir, "grid", lambda path: is_finished(path, expected[path]),
                                    say=said.append)
    assert outcome == {str(done): None, str(failed): "the run's own reason"}
    assert not marker.exists(), "a result pickle from the sweep folder was loaded"
    assert sum("already in Slurm's queue" in line for line in said) == 2


def test_a_local_job_killed_with_a_planted_result_pickle_is_decided_without_loading_it(tmp_path, monkeypatch):
    """The run plants a hostile pickle where its job's result goes, then SIGKILLs the job, which so never
    writes its own: the sweep reports the point failed, and loads nothing."""
    import pickle

    from src.sweep import make_executor, run_local

    monkeypatch.setenv("PYTHONPATH", str(REPO))  # submitit's job processes unpickle src.sweep.TrainingJob
    marker, hostile = tmp_path / "pwned", tmp_path / "hostile.pkl"
    hostile.write_bytes(pickle.dumps(Hostile(marker)))
    sweep_dir = tmp_path / "sweep"
    planting = tmp_path / "planting.py"
    planting.write_text(
        "import os, shutil, signal\njob = os.environ['SUBMITIT_LOCAL_JOB_ID']\n"
        f"shutil.copy({str(hostile)!r}, os.path.join({str(sweep_dir)!r}, '.submitit', job, job + '_0_result.pkl'))\n"
        "os.kill(os.getppid(), signal.SIGKILL)\n")
    fine = tmp_path / "fine.py"
    fine.write_text("import sys\nopen(sys.argv[2], 'w').write('done')\n")
    jobs = [TrainingJob("cifar10", tmp_path / "killed", [], {}, planting),
            TrainingJob("cifar10", tmp_path / "fine", [], {}, fine)]
    outcome, stopped = run_local(jobs, make_executor("local", sweep_dir, {}), 2, lambda path: os.path.isfile(path),
                                 say=lambda text: None)
    assert stopped is None and outcome[str(tmp_path / "fine")] is None
    assert outcome[str(tmp_path / "killed")] == "its job ended without finishing the run; rerun the sweep to resume it"
    assert list(sweep_dir.glob(".submitit/*/*_result.pkl")), "the planted pickle was not where a result goes"
    assert not marker.exists(), "a result pickle from the sweep folder was loaded"


def test_gpus_per_job_on_slurm_is_refused_before_anything_is_written(data_dir, tmp_path):
    """Slurm gives a job its GPUs with --gpus: --gpus_per_job there would be silently ignored."""
    result = sweep(data_dir, "cifar10", tmp_path / "grid", "--lr=0.1,0.05", "--backend=slurm", "--gpus_per_job=2")
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert "--gpus_per_job=2 is for --backend=local" in result.stderr and "--gpus=2" in result.stderr
    assert not (tmp_path / "grid").exists() and "Traceback" not in result.stderr


def test_gpu_groups_from_the_visible_devices(monkeypatch):
    from src.sweep import gpu_groups, visible_gpus

    for text, expected in (("0,1,2,3,4", ["0", "1", "2", "3", "4"]), ("", []), ("-1", []), ("3,1,-1,2", ["3", "1"])):
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", text)
        assert visible_gpus() == expected, text
    assert gpu_groups(2, ["0", "1", "2", "3", "4"]) == [["0", "1"], ["2", "3"]]  # the fifth one idles
    assert gpu_groups(2, []) == [] and gpu_groups(0, ["0", "1"]) == []  # no GPU, or none asked: as before
    with pytest.raises(UsageError, match="only 2 GPUs are visible"):
        gpu_groups(3, ["0", "1"])


def test_local_jobs_run_one_per_free_gpu_group_each_seeing_its_own(tmp_path, monkeypatch):
    """Four jobs on a faked list of four GPUs, two per job: two at a time, never two on one group."""
    import itertools
    import json

    from src.sweep import gpu_groups, make_executor, run_local

    monkeypatch.setenv("PYTHONPATH", str(REPO))  # submitit's job processes unpickle src.sweep.TrainingJob
    fake_runner = tmp_path / "runner.py"  # records what it saw, and when
    fake_runner.write_text("import json, os, sys, time\nstart = time.time()\ntime.sleep(1.5)\n"
                           "open(sys.argv[2], 'w').write(json.dumps([os.environ.get('CUDA_VISIBLE_DEVICES'), "
                           "start, time.time()]))\n")
    jobs = [TrainingJob("cifar10", tmp_path / f"run{i}", [], {"CUDA_VISIBLE_DEVICES": "0,1,2,3"}, fake_runner)
            for i in range(4)]
    groups = gpu_groups(2, ["0", "1", "2", "3"])
    outcome, stopped = run_local(jobs, make_executor("local", tmp_path / "sweep", {}), 1,
                                 lambda path: os.path.isfile(path), say=lambda text: None, gpu_groups=groups)
    assert stopped is None and list(outcome.values()) == [None] * 4
    seen = [json.loads((tmp_path / f"run{i}").read_text()) for i in range(4)]
    assert sorted(gpus for gpus, _, _ in seen) == ["0,1", "0,1", "2,3", "2,3"]
    overlapping = [(a, b) for a, b in itertools.combinations(seen, 2) if a[1] < b[2] and b[1] < a[2]]
    assert overlapping, "the two groups never ran at once"
    assert all(a[0] != b[0] for a, b in overlapping), "two jobs ran on one group at once"


def test_gpus_per_job_beyond_the_visible_gpus_is_a_usage_error(data_dir, tmp_path):
    result = sweep(data_dir, "cifar10", tmp_path / "grid", "--lr=0.1,0.05", "--gpus_per_job=3",
                   CUDA_VISIBLE_DEVICES="0,1")
    assert result.returncode == 2 and "only 2 GPUs are visible" in result.stderr
    assert result.stderr.count("\n") == 1 and not (tmp_path / "grid").exists()
    without = sweep(data_dir, "cifar10", tmp_path / "cpu", *TINY, "--n_epochs=1", "--gpus_per_job=2",
                    CUDA_VISIBLE_DEVICES="")
    assert without.returncode == 0, without.stderr
    assert "no GPU visible" in without.stdout and without.stdout.count("started ") == 1



def test_points_slurm_still_has_are_found_from_the_recorded_arrays(tmp_path, monkeypatch):
    """What a rerun asks squeue: only this sweep's recorded jobs count, and only while pending or running."""
    import json

    from src.sweep import slurm as sweep_slurm

    (tmp_path / ".submitit").mkdir()
    (tmp_path / ".submitit" / "array_41.json").write_text(json.dumps({"41_0": "a", "41_1": "b", "41_2": "c"}))
    (tmp_path / ".submitit" / "array_50.json").write_text(json.dumps({"50": "d"}))
    asked = []

    def fake_squeue(*args):
        asked.append(args)
        return ["41_0|COMPLETED", "41_1|RUNNING", "41_2|PENDING", "50|REQUEUED", "99_0|RUNNING"]

    monkeypatch.setattr(sweep_slurm, "squeue", fake_squeue)
    assert sweep_slurm.queued_points(tmp_path, "grid") == {"b": ("41_1", "RUNNING"), "c": ("41_2", "PENDING"),
                                                           "d": ("50", "REQUEUED")}
    assert "--name=grid" in asked[0] and "--array" in asked[0]
    assert sweep_slurm.queued_points(tmp_path / "elsewhere", "grid") == {}
