"""Sweeps on Slurm: one job array per submission, which points Slurm already has, and waiting on `squeue`.

The sweep waits on `squeue` rather than on submitit's `sacct`: a cluster without accounting (a
workstation's one-node Slurm) has no `sacct`, and a requeued job stays in `squeue` while it waits,
where `sacct` would show the attempt that ended. Each submitted array is recorded in the sweep
folder (`.submitit/array_<id>.json`: the run folder of each task), so that a rerun knows which of
its points are still pending or running and does not submit them twice.
"""
import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from src.errors import RunError
from src.sweep.jobs import point_outcome

# States in which Slurm still has a job's point: it will run, is running or is being requeued.
LIVE = {"PENDING", "RUNNING", "REQUEUED", "REQUEUE_FED", "REQUEUE_HOLD", "CONFIGURING", "COMPLETING", "RESIZING",
        "SUSPENDED", "PREEMPTED", "SIGNALING", "STAGE_OUT", "STOPPED", "RESV_DEL_HOLD", "SPECIAL_EXIT"}
# `scancel --signal=USR2 --batch JOB` (a scheduler's or an admin's warning to the batch shell alone) would
# kill submitit's batch shell (USR2's default action), and with it the run, before the run could checkpoint:
# the shell runs submitit's `srun` in the background and passes the warning on to it, which passes it to
# the job (checked on a one-node Slurm 22.05: without this, the step dies by signal 12 with no checkpoint).
PASS_ON_WARNING = [
    "srun() {",
    '    command srun "$@" &',
    "    local pid=$!",
    '    trap "kill -USR2 $pid" USR2',
    "    while kill -0 $pid 2>/dev/null; do wait $pid; done",
    "    trap - USR2",
    "    wait $pid",
    "}",
]
POLL_SECONDS = (1.0, 15.0)  # the first wait between two looks at squeue, and the longest
SQUEUE_PATIENCE_SECONDS = 60


def squeue(*args):
    """squeue's lines, or a one-line RunError when it cannot answer."""
    try:
        done = subprocess.run(["squeue", "--noheader", *args], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise RunError(f"squeue did not answer: {e}") from None
    if done.returncode != 0:
        text = (done.stderr.strip().splitlines() or [f"exit code {done.returncode}"])[-1]
        raise RunError(f"squeue failed: {text}")
    return done.stdout.splitlines()


def recorded_jobs(sweep_dir):
    """{job id ('ARRAY_TASK', or 'JOB' for a single point): run folder} of every job this sweep folder submitted."""
    from src.files import read_json

    jobs = {}
    for path in sorted((Path(sweep_dir) / ".submitit").glob("array_*.json")):
        try:
            jobs.update({str(job_id): str(folder) for job_id, folder in read_json(path).items()})
        except (OSError, ValueError, TypeError, AttributeError):
            continue  # unreadable: its jobs are not counted as live, at worst a point is submitted twice
    return jobs


def live_jobs(job_name, job_ids):
    """{job id: state} of those of `job_ids` that Slurm still has pending, running or being requeued."""
    if not job_ids:
        return {}
    jobs = {}
    for line in squeue("--array", "--me", f"--name={job_name}", "--format=%i|%T"):
        job_id, _, state = line.strip().partition("|")
        if job_id in job_ids and state in LIVE:
            jobs[job_id] = state
    return jobs


def queued_points(sweep_dir, job_name):
    """{run folder: (job id, state)} for this sweep's points that Slurm has pending or running."""
    jobs = recorded_jobs(sweep_dir)
    return {jobs[job_id]: (job_id, state) for job_id, state in live_jobs(job_name, set(jobs)).items()}


@contextlib.contextmanager
def stderr_to(file):
    """File descriptor 2 into `file` meanwhile: sbatch, which submitit starts, writes its refusal there, and the
    sweep says it once, in its own one line."""
    sys.stderr.flush()
    saved = os.dup(2)
    os.dup2(file.fileno(), 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def submit_array(jobs, executor, sweep_dir):
    """One job array for `jobs` (a single job for one) -> {job id: run folder}, also recorded in the sweep folder."""
    from src.files import write_json

    with tempfile.TemporaryFile() as printed:
        try:
            with stderr_to(printed), executor.batch():
                handles = [executor.submit(job) for job in jobs]
        except Exception as e:  # noqa: BLE001 (submitit's error holds sbatch's output: its last error line says why)
            printed.seek(0)
            lines = [line.strip() for line in (printed.read().decode(errors="replace") + str(e)).splitlines()]
            reasons = [line for line in lines if "error" in line.lower()] or [line for line in lines if line]
            raise RunError(f"sbatch refused the job array: {(reasons or [type(e).__name__])[-1][:300]}") from None
        printed.seek(0)
        sys.stderr.write(printed.read().decode(errors="replace"))  # sbatch's warnings, if any
    folders = {handle.job_id: job.save_path for handle, job in zip(handles, jobs, strict=True)}
    write_json(Path(sweep_dir) / ".submitit" / f"array_{handles[0].job_id.split('_')[0]}.json", folders)
    return folders


def wait_for(folders, job_name, sweep_dir, finished, say=print):
    """Block until Slurm has none of the jobs of `folders` ({job id: run folder}) -> {job id: None, or its
    one-line failure}; a job succeeded when `finished(run folder)` says its run is finished."""
    waiting, pause, outcome, answered = set(folders), POLL_SECONDS[0], {}, time.monotonic()
    while waiting:
        try:
            live = set(live_jobs(job_name, waiting))
            answered = time.monotonic()
        except RunError:  # slurmctld restarting or busy: the jobs run on; give up only after a quiet minute
            if time.monotonic() - answered > SQUEUE_PATIENCE_SECONDS:
                raise
            time.sleep(pause)
            continue
        for job_id in sorted(waiting - live):
            outcome[job_id] = job_error(Path(sweep_dir) / ".submitit", job_id, finished(folders[job_id]))
            say(f"{'done' if outcome[job_id] is None else 'FAILED'}: {folders[job_id]} (job {job_id})")
        waiting &= live
        if waiting:
            time.sleep(pause)
            pause = min(pause * 1.25, POLL_SECONDS[1])
    return outcome


def job_error(folder, job_id, finished):
    """None when the job's run `finished`, else one line: the reason in the job's stderr, or Slurm's final state.

    Never from submitit's result pickle: the sweep folder holds it, and a file planted there would run
    code when the sweep is rerun; the run folder's status.json and the job's stderr say it all."""
    from submitit.core.utils import JobPaths

    if finished:
        return None
    state = final_state(job_id)
    return point_outcome(False, JobPaths(folder / "%j", job_id=job_id, task_id=0).stderr,
                         f"in Slurm's state {state}" if state else None)


def final_state(job_id):
    """The state Slurm gives a job that left its queue (COMPLETED, FAILED, CANCELLED, TIMEOUT, NODE_FAIL,
    OUT_OF_MEMORY...), or None once slurmctld has forgotten it (MinJobAge, 300 s by default)."""
    try:
        done = subprocess.run(["scontrol", "--oneliner", "show", "job", job_id], capture_output=True, text=True,
                              timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    fields = dict(word.partition("=")[::2] for word in done.stdout.split() if "=" in word)
    return fields.get("JobState") if done.returncode == 0 else None


def run_slurm(jobs_to_run, executor, sweep_dir, job_name, finished, say=print):
    """Submit the points Slurm does not already have as one job array, then wait for them and for the
    already queued ones -> {run folder: None or the failure's one line}; `finished(run folder)` says whether
    a point's run is finished. Ctrl-C leaves the jobs running."""
    queued = queued_points(sweep_dir, job_name)
    new, folders = [], {}  # folders: job id -> run folder, for every point waited for
    for job in jobs_to_run:
        if job.save_path not in queued:
            new.append(job)
            continue
        job_id, state = queued[job.save_path]
        folders[job_id] = job.save_path
        say(f"already in Slurm's queue as job {job_id} ({state.lower()}), not submitted again: {job.save_path}")
    if new:
        submitted = submit_array(new, executor, sweep_dir)
        say(f"submitted job array {next(iter(submitted)).split('_')[0]} with {len(new)} runs")
        folders.update(submitted)
    outcome = wait_for(folders, job_name, sweep_dir, finished, say)
    return {folders[job_id]: error for job_id, error in outcome.items()}


def run_slurm_stream(jobs_to_run, executor, sweep_dir, job_name, finished, parallel, ended, say=print):
    """As run_slurm, for jobs drawn one at a time (a search's trials): at most `parallel` in Slurm's queue at
    once, each submitted alone as a place frees, and `ended(job, error)` called as each leaves the queue, before
    the next is drawn. A job whose run folder Slurm already has queued or running (from an earlier driver) is
    waited for, not submitted again. -> {run folder: None or the failure's one line}; Ctrl-C leaves the jobs
    running."""
    queued = queued_points(sweep_dir, job_name)
    pending, waiting, outcome = iter(jobs_to_run), {}, {}  # waiting: job id -> job
    pause, answered = POLL_SECONDS[0], time.monotonic()
    while pending is not None or waiting:
        while pending is not None and len(waiting) < parallel:
            job = next(pending, None)
            if job is None:
                pending = None
            elif job.save_path in queued:
                job_id, state = queued.pop(job.save_path)
                say(f"already in Slurm's queue as job {job_id} ({state.lower()}), not submitted again: {job.save_path}")
                waiting[job_id] = job
            else:
                job_id = next(iter(submit_array([job], executor, sweep_dir)))
                say(f"submitted job {job_id}: {job.save_path}")
                waiting[job_id] = job
        try:
            live = set(live_jobs(job_name, set(waiting)))
            answered = time.monotonic()
        except RunError:  # slurmctld restarting or busy, as in wait_for
            if time.monotonic() - answered > SQUEUE_PATIENCE_SECONDS:
                raise
            live = set(waiting)
        for job_id in sorted(set(waiting) - live):
            job = waiting.pop(job_id)
            outcome[job.save_path] = job_error(Path(sweep_dir) / ".submitit", job_id, finished(job.save_path))
            say(f"{'done' if outcome[job.save_path] is None else 'FAILED'}: {job.save_path} (job {job_id})")
            ended(job, outcome[job.save_path])
            pause = POLL_SECONDS[0]
        if waiting:
            time.sleep(pause)
            pause = min(pause * 1.25, POLL_SECONDS[1])
    return outcome


def slurm_parameters(name, partition=None, time_min=60, gpus=0, cpus=4, mem_gb=16, array_parallelism=8,
                     signal_delay_s=120):
    """submitit's `update_parameters` for a Slurm job array of single-task jobs, warned `signal_delay_s`
    before their time limit (time to finish a step and write a checkpoint before the kill)."""
    parameters = {
        "slurm_job_name": name,
        "timeout_min": time_min,
        "cpus_per_task": cpus,
        "mem_gb": mem_gb,
        "tasks_per_node": 1,
        "nodes": 1,
        "slurm_array_parallelism": array_parallelism,
        "slurm_signal_delay_s": signal_delay_s,
        "slurm_additional_parameters": {"requeue": True},
        "slurm_setup": PASS_ON_WARNING,
    }
    if gpus:
        parameters["gpus_per_node"] = gpus
    if partition:
        parameters["slurm_partition"] = partition
    return parameters


def check_slurm():
    """submitit would fail with a traceback on a machine without Slurm; say it in one line instead."""
    missing = [command for command in ("sbatch", "srun", "squeue") if shutil.which(command) is None]
    if missing:
        raise RunError(f"{missing[0]} not found; --backend=slurm runs where Slurm's commands are on PATH (a "
                       "cluster's login node); here, use --backend=local")
