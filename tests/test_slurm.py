"""The Slurm path on a real (one-node) Slurm cluster: job arrays, preemption, time limits, the DDP sbatch script.

Needs a running cluster (`sudo bash etc/local_slurm.sh up`; .ci/run starts one): skipped without one,
failed on CI. Slurm holds a requeued job until its begin time, two minutes later; `released` lets
each test's requeued jobs start again at once, as a busy cluster's scheduler would at some point.
"""
import json
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from conftest import REPO, TINY, assert_identical, script_env, wait_for_mid_epoch_checkpoint
from test_distributed import DDP_ARGS, ddp_reference  # noqa: F401  (the uninterrupted 2-process run)
from test_sweep import GRID_ARGS, sweep

cluster = pytest.mark.slurm  # the tests that need one; etc/local_slurm.sh's own logic is tested without
LOCAL_SLURM = REPO / "etc" / "local_slurm.sh"
FAULTS = str(Path(__file__).parent / "faults")
# Every fsync sleeps: a run of these settings then lasts some seconds without using the cores (the tests
# must catch it running), and computes exactly what it would without the sleeps.
SLOW = {"PYTHONPATH": FAULTS, "SLOW_FSYNC_SECONDS": "0.05"}
SLURM = ["--backend=slurm", "--cpus=1", "--mem=1", "--time=10"]


def squeue(*fields):
    """[(field, ...)] of this user's jobs, one row per array task."""
    done = subprocess.run(["squeue", "--noheader", "--array", "--me", f"--format={'|'.join(fields)}"],
                          capture_output=True, text=True, timeout=30)
    return [tuple(line.split("|")) for line in done.stdout.splitlines()]


def scontrol(*args):
    return subprocess.run(["scontrol", *args], capture_output=True, text=True, timeout=30)


@pytest.fixture
def released():
    """A set of job names: their requeued jobs start again 2 s after their requeue, not 2 min; at the end, their
    jobs are cancelled. Not at once: a job started again in the second of its requeue is refused by slurmd
    ("Job credential revoked", whose times have one-second steps) and ends FAILED."""
    names, stop, seen = set(), threading.Event(), {}

    def release():
        while not stop.wait(0.3):
            for job, state, reason, name in squeue("%i", "%T", "%r", "%j"):
                if name in names and state == "PENDING" and reason == "BeginTime":
                    if time.monotonic() - seen.setdefault(job, time.monotonic()) >= 2:
                        scontrol("update", f"jobid={job}", "StartTime=now")
                        del seen[job]

    thread = threading.Thread(target=release, daemon=True)
    thread.start()
    yield names
    stop.set()
    thread.join()
    for name in names:
        subprocess.run(["scancel", f"--name={name}"], capture_output=True, timeout=30)


def unique(tmp_path, name):
    """A sweep folder whose name (the jobs' name) no other test or test session uses."""
    return tmp_path / f"{name}-{os.getpid()}-{tmp_path.name}"


def job_of(sweep_dir, run_dir, timeout=60):
    """The Slurm job id ('ARRAY_TASK') the sweep submitted for `run_dir`, once it is recorded."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for path in (sweep_dir / ".submitit").glob("array_*.json"):
            for job_id, folder in json.loads(path.read_text()).items():
                if folder == str(run_dir):
                    return job_id
        time.sleep(0.1)
    raise AssertionError(f"no job recorded for {run_dir}")


def state_of(job_id):
    return {job: state for job, state in squeue("%i", "%T")}.get(job_id)


def fake_sinfo(tmp_path, *states):
    """A folder for PATH's front whose `sinfo` answers `states` in turn (the last one from then on) and whose
    `scontrol` does nothing; tmp_path/calls counts the sinfo calls."""
    folder = tmp_path / "bin"
    folder.mkdir(parents=True)
    (tmp_path / "states").write_text("".join(f"{state}\n" for state in states))
    (folder / "sinfo").write_text(
        f"#!/bin/sh\nn=$(( $(cat {tmp_path}/calls 2>/dev/null || echo 0) + 1 )); echo $n >{tmp_path}/calls\n"
        f"line=$(sed -n ${{n}}p {tmp_path}/states); [ -n \"$line\" ] || line=$(tail -n 1 {tmp_path}/states)\n"
        "[ \"$line\" = none ] || echo \"$line\"\n")
    (folder / "scontrol").write_text("#!/bin/sh\nexit 0\n")
    for command in folder.iterdir():
        command.chmod(0o755)
    return folder


def local_slurm(script, path, **env):
    """bash with etc/local_slurm.sh sourced (its functions only), then `script`, with `path` first on PATH."""
    return subprocess.run(["bash", "-c", f"source {LOCAL_SLURM}; {script}"], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "PATH": f"{path}:{os.environ['PATH']}", **env})


def test_local_slurm_status_fails_on_a_node_that_cannot_run_jobs(tmp_path):
    """sinfo's `idle*` is a node whose slurmd does not answer; `~` powered off, `#` powering up."""
    states = ("idle", "mixed", "allocated", "idle*", "idle~", "idle#", "mixed*", "down*", "drained", "none")
    for i, state in enumerate(states):
        bin_dir = fake_sinfo(tmp_path / str(i), state)
        done = subprocess.run(["bash", str(LOCAL_SLURM), "status"], capture_output=True, text=True, timeout=60,
                              env={**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"})
        usable = state in ("idle", "mixed", "allocated")
        assert done.returncode == (0 if usable else 1), (state, done.stdout, done.stderr)
        assert ("not usable" in done.stdout) == (not usable and state != "none"), (state, done.stdout)


def test_local_slurm_waits_while_the_node_does_not_respond(tmp_path):
    """`up` waits for a node that can run jobs: `idle*` (slurmd dead) is not one."""
    bin_dir = fake_sinfo(tmp_path, "idle*", "idle*", "idle~", "idle")
    done = local_slurm("wait_idle", bin_dir)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "calls").read_text().strip() == "4"
    for state in ("idle*", "idle~", "idle#", "mixed*", "allocated*", "down", "drained", ""):
        assert local_slurm(f"usable '{state}'", bin_dir).returncode == 1, state
    for state in ("idle", "mixed", "allocated", "completing"):
        assert local_slurm(f"usable '{state}'", bin_dir).returncode == 0, state


def test_local_slurm_leaves_no_policy_behind_when_apt_get_fails(tmp_path):
    """The policy that keeps the packages from starting daemons goes, however the install ends; the
    system's own stays."""
    bin_dir, policy_dir = tmp_path / "bin", tmp_path / "sbin"
    bin_dir.mkdir()
    policy_dir.mkdir()
    apt_get = bin_dir / "apt-get"  # `install` notes whether the policy is in place, then fails
    apt_get.write_text(f"#!/bin/sh\n[ \"$1\" = update ] && exit 0\ncat {policy_dir}/policy-rc.d >{tmp_path}/seen"
                       "\nexit 100\n")
    apt_get.chmod(0o755)
    path = f"{bin_dir}:/usr/bin:/bin"  # not /usr/sbin: slurmctld looks missing, so it installs
    done = subprocess.run(["bash", "-c", f"source {LOCAL_SLURM}; install_packages"], capture_output=True,
                          text=True, timeout=60, env={**os.environ, "PATH": path,
                                                      "LOCAL_SLURM_POLICY_DIR": str(policy_dir)})
    assert done.returncode == 100, done.stderr
    assert "exit 101" in (tmp_path / "seen").read_text()  # in place while apt-get ran
    assert list(policy_dir.iterdir()) == []
    (policy_dir / "policy-rc.d").write_text("the system's own\n")
    done = subprocess.run(["bash", "-c", f"source {LOCAL_SLURM}; install_packages"], capture_output=True,
                          text=True, timeout=60, env={**os.environ, "PATH": path,
                                                      "LOCAL_SLURM_POLICY_DIR": str(policy_dir)})
    assert done.returncode == 100 and (policy_dir / "policy-rc.d").read_text() == "the system's own\n"


@cluster
def test_a_grid_runs_as_a_job_array_and_a_rerun_skips_every_finished_point(data_dir, tmp_path, released):
    sweep_dir = unique(tmp_path, "grid")
    released.add(sweep_dir.name)
    args = ["cifar10", sweep_dir, *TINY, "--n_filters=4,8", "--lr=0.1,0.05", "--n_epochs=1", *SLURM]
    first = sweep(data_dir, *args)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "submitted job array" in first.stdout and first.stdout.count("done: ") == 4
    table = first.stdout[first.stdout.index("run "):]
    assert table.count("finished") == 4
    again = sweep(data_dir, *args)
    assert again.returncode == 0, again.stderr[-3000:]
    plan = [line for line in again.stdout.splitlines() if str(sweep_dir) in line]
    assert len(plan) == 4 and all(line.startswith("finished") for line in plan)
    assert "submitted" not in again.stdout
    assert len(list((sweep_dir / ".submitit").glob("array_*.json"))) == 1


@cluster
def test_a_warned_array_task_checkpoints_is_requeued_and_resumes_exactly(reference_run, data_dir, tmp_path,
                                                                        released):
    """`scancel --signal=USR2 --batch`: the warning a scheduler sends to the batch shell alone."""
    sweep_dir = unique(tmp_path, "preempt")
    released.add(sweep_dir.name)
    run = sweep_dir / "n_filters=8"
    process = sweep(data_dir, "cifar10", sweep_dir, *GRID_ARGS, *SLURM, wait=False, **SLOW)
    job = job_of(sweep_dir, run)
    wait_for_mid_epoch_checkpoint(process, run)
    subprocess.run(["scancel", "--signal=USR2", "--batch", job], check=True, timeout=30)
    out, err = process.communicate(timeout=240)
    assert process.returncode == 0, err[-3000:]
    assert "stopped at iteration" in (run / "stderr.log").read_text()  # checkpointed on the warning, then exited
    assert "resuming from" in (run / "stdout.log").read_text()  # the requeued job resumed it
    assert_identical(reference_run, run)


@cluster
def test_a_run_longer_than_its_time_limit_is_warned_requeued_and_finishes(data_dir, tmp_path, released):
    """--time=1 (minute), warned 15 s ahead (Slurm warns up to a minute early: with 30 s, 23 s into the job);
    the run needs about 65 s (9 s an epoch: sleeping fsyncs, a checkpoint after every step): no attempt can
    finish it alone."""
    sweep_dir = unique(tmp_path, "limit")
    released.add(sweep_dir.name)
    args = [*TINY, "--n_epochs=7", "--checkpoint_every_n_batches=1"]
    result = sweep(data_dir, "cifar10", sweep_dir, *args, "--n_filters=4", *SLURM[:-1], "--time=1",
                   "--signal_delay=15", PYTHONPATH=FAULTS, SLOW_FSYNC_SECONDS="0.1")
    assert result.returncode == 0, result.stderr[-3000:]
    (run,) = [path for path in sweep_dir.iterdir() if path.is_dir() and not path.name.startswith(".")]
    shown = scontrol("show", "job", job_of(sweep_dir, run)).stdout
    assert "TimeLimit=00:01:00" in shown and "Restarts=0" not in shown, shown  # requeued by the warning
    assert "stopped at iteration" in (run / "stderr.log").read_text()
    assert "resuming from" in (run / "stdout.log").read_text()
    assert json.loads((run / "status.json").read_text())["finished"]


@cluster
def test_a_rerun_while_the_jobs_are_queued_or_running_submits_nothing_twice(data_dir, tmp_path, released):
    sweep_dir = unique(tmp_path, "twice")
    released.add(sweep_dir.name)
    args = ["cifar10", sweep_dir, *TINY, "--n_filters=4,8", "--n_epochs=3", "--checkpoint_every_n_batches=1",
            *SLURM]
    first = sweep(data_dir, *args, wait=False, **SLOW)
    jobs = {job_of(sweep_dir, sweep_dir / name) for name in ("n_filters=4", "n_filters=8")}
    assert all(state_of(job) in ("PENDING", "CONFIGURING", "RUNNING") for job in jobs)
    again = sweep(data_dir, *args, **SLOW)
    out, err = first.communicate(timeout=240)
    assert first.returncode == 0, err[-3000:]
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("already in Slurm's queue as job") == 2 and "submitted job array" not in again.stdout
    assert len(list((sweep_dir / ".submitit").glob("array_*.json"))) == 1
    assert again.stdout[again.stdout.index("run "):].count("finished") == 2


@cluster
def test_a_failed_point_shows_its_reason_not_a_log_path(data_dir, tmp_path, released):
    """One point the runner refuses (a folder that is not a run folder), one cancelled while it runs."""
    sweep_dir = unique(tmp_path, "fails")
    released.add(sweep_dir.name)
    refused = sweep_dir / "n_filters=4"
    refused.mkdir(parents=True)
    (refused / "notes.txt").write_text("not a run folder")
    cancelled = sweep_dir / "n_filters=8"
    process = sweep(data_dir, "cifar10", sweep_dir, *TINY, "--n_filters=4,8", "--n_epochs=3",
                    "--checkpoint_every_n_batches=1", *SLURM, wait=False, **SLOW)
    wait_for_mid_epoch_checkpoint(process, cancelled)
    subprocess.run(["scancel", job_of(sweep_dir, cancelled)], check=True, timeout=30)
    out, err = process.communicate(timeout=240)
    assert process.returncode == 1, err[-3000:]
    failed = {line.split(": ")[1]: line for line in err.splitlines() if line.startswith("failed: ")}
    assert set(failed) == {str(refused), str(cancelled)}, err[-3000:]
    assert "notes.txt" in failed[str(refused)]  # the runner's own reason
    assert "SIGTERM" in failed[str(cancelled)] or "CANCELLED" in failed[str(cancelled)]
    assert ".submitit" not in err and "Traceback" not in err



def runner_of(run):
    """The pid of the runner process training `run` (argv: python RUNNER CONFIG RUN ...)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if str(run).encode() in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[2:4]:
                found.append(int(pid))
        except OSError:
            continue  # ended meanwhile
    (pid,) = found
    return pid


@cluster
def test_a_result_pickle_planted_for_a_killed_job_is_never_loaded(data_dir, tmp_path, released):
    """A job killed outright (SIGKILL) writes no result of its own: a hostile pickle planted where it would go
    is what submitit's reader would load. The sweep says the point failed, its rerun finishes it; neither loads it."""
    import pickle

    from submitit.core.utils import JobPaths

    from test_sweep import Hostile

    sweep_dir, marker = unique(tmp_path, "planted"), tmp_path / "pwned"
    released.add(sweep_dir.name)
    args = ["cifar10", sweep_dir, *TINY, "--n_filters=4", "--n_epochs=2", "--checkpoint_every_n_batches=1", *SLURM]
    (run,) = [Path(line.split()[2]) for line in sweep(data_dir, *args, "--dry_run").stdout.splitlines()]  # to run
    process = sweep(data_dir, *args, wait=False, **SLOW)
    job = job_of(sweep_dir, run)
    wait_for_mid_epoch_checkpoint(process, run)
    planted = JobPaths(sweep_dir / ".submitit" / "%j", job_id=job, task_id=0).result_pickle
    planted.write_bytes(pickle.dumps(Hostile(marker)))
    # As the kernel's OOM killer would: the job's process, then its run, before the job can write a result.
    runner = runner_of(run)
    job_process = int(Path(f"/proc/{runner}/stat").read_text().rsplit(")", 1)[1].split()[1])  # its parent
    os.kill(job_process, signal.SIGKILL)
    os.kill(runner, signal.SIGKILL)
    out, err = process.communicate(timeout=240)
    assert process.returncode == 1 and f"failed: {run}: " in err, err[-3000:]
    assert "Traceback" not in err and planted.exists()
    again = sweep(data_dir, *args, **SLOW)
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads((run / "status.json").read_text())["finished"]
    assert not marker.exists(), "a result pickle from the sweep folder was loaded"


@cluster
def test_a_job_array_slurm_refuses_is_one_line(data_dir, tmp_path):
    """More CPUs per job than the node has: sbatch refuses it (EnforcePartLimits=ALL), the sweep says why."""
    cpus = max(int(line.split()[0]) for line in subprocess.run(["sinfo", "--noheader", "--format=%c"],
                                                               capture_output=True, text=True).stdout.splitlines())
    result = sweep(data_dir, "cifar10", unique(tmp_path, "refused"), *TINY, "--lr=0.1,0.05", *SLURM[:1],
                   f"--cpus={cpus + 1}", "--mem=1")
    assert result.returncode == 1, result.stderr
    assert result.stderr.count("\n") == 1 and "sbatch refused the job array: " in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


def sbatch_ddp(data_dir, run, *extra):
    """etc/slurm_ddp.sbatch with 2 processes on this machine's CPUs (gloo), from the repository root -> job id."""
    env = script_env(data_dir, NPROC_PER_NODE="2", ENV_FILE="/dev/null")  # not env.sh's DATA_DIR
    run.parent.mkdir(parents=True, exist_ok=True)  # for its --output: sbatch does not create the folder
    command = ["sbatch", "--parsable", "--gpus-per-node=0", "--cpus-per-task=2", f"--job-name={run.parent.name}",
               f"--output={run.parent}/slurm-%j.out", "etc/slurm_ddp.sbatch", DDP_ARGS[0], str(run),
               *DDP_ARGS[1:], *extra]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, env=env, timeout=30, check=True)
    return done.stdout.strip().split(";")[0]


class JobAsProcess:
    """A Slurm job for wait_for_mid_epoch_checkpoint: poll() is None while Slurm has it pending or running."""

    def __init__(self, job_id):
        self.job_id, self.state, self.asked = job_id, "PENDING", 0.0

    def poll(self):
        if time.monotonic() - self.asked > 0.5:  # squeue at most twice a second
            self.state, self.asked = state_of(self.job_id), time.monotonic()
        return None if self.state in ("PENDING", "RUNNING", "CONFIGURING") else 0


def wait_gone(job_id, timeout=240):
    deadline = time.monotonic() + timeout
    while state_of(job_id) not in (None, "COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"):
        assert time.monotonic() < deadline, f"job {job_id} still {state_of(job_id)}"
        time.sleep(0.3)


@cluster
def test_the_ddp_sbatch_script_checkpoints_when_warned_requeues_and_resumes_exactly(ddp_reference, data_dir,  # noqa: F811
                                                                                    tmp_path, released):
    run = unique(tmp_path, "ddp") / "run"
    released.add(run.parent.name)
    job = sbatch_ddp(data_dir, run)
    wait_for_mid_epoch_checkpoint(JobAsProcess(job), run, after_iteration=15)
    subprocess.run(["scancel", "--signal=TERM", "--batch", job], check=True, timeout=30)  # as --signal=B:TERM@120
    wait_gone(job)
    assert state_of(job) in (None, "COMPLETED")
    assert "resuming from" in (run / "stdout.log").read_text()
    assert json.loads((run / "status.json").read_text())["finished"]
    assert_identical(ddp_reference, run)
    assert "Restarts=1" in scontrol("show", "job", job).stdout or state_of(job) is None
    # Not warned, it fails and is not requeued: a refused config would fail again and again.
    failed = sbatch_ddp(data_dir, run.parent / "bad", "--batch_size=33")
    wait_gone(failed, timeout=120)
    shown = scontrol("show", "job", failed).stdout
    assert "JobState=FAILED" in shown and "Restarts=0" in shown, shown
