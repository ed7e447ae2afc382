"""Sweeps: a grid of overrides -> one run folder per point, each run executed by submitit.

Every point is the ordinary runner (`train_simple_CNN.py CONFIG SAVE_PATH --key=value ...`) in a
subprocess of a submitit job, so a sweep's run behaves exactly like a run started by hand:
rerunning the sweep skips finished points and resumes the others. On Slurm's time-out or
preemption warning (SIGUSR2, `signal_delay_s` before the end), submitit calls the job's
`checkpoint()`: it passes the signal on to the runner, which checkpoints and exits, and submitit
requeues the job, which then resumes the run.
"""
import itertools
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from src.config import check_known_key, parse_value
from src.errors import UsageError

TRAIN_SCRIPT = Path(__file__).resolve().parent / "scripts" / "train_simple_CNN.py"
PLAN = "sweep.json"
UNLIMITED = 10**6


def split_values(key, text, root):
    """`--key=a,b,c` -> [a, b, c] typed by the root; a JSON list or dict value is one value."""
    check_known_key(key, root)
    parts = [text] if text.lstrip().startswith(("[", "{")) else text.split(",")
    return [parse_value(key, part.strip(), root) for part in parts]


def expand_grid(overrides, root, seeds=0):
    """{key: text} -> [{key: value, ...}] for every combination; `seeds` > 0 adds seed = 1..seeds."""
    axes = {key: split_values(key, text, root) for key, text in overrides.items()}
    if seeds:
        if "seed" in axes:
            raise UsageError("give either --seeds=N or --seed=..., not both")
        axes["seed"] = list(range(1, seeds + 1))
    keys = list(axes)
    return [dict(zip(keys, values, strict=True)) for values in itertools.product(*(axes[k] for k in keys))]


def point_name(point, varying):
    """Folder name from the keys that vary across the grid, e.g. `n_filters=8-lr=0.1`."""
    shown = [key for key in point if key in varying] or list(point)
    return "-".join(f"{key}={_text(point[key])}" for key in shown) or "run"


def _text(value):
    if isinstance(value, bool):
        return "true" if value else "false"
    return json.dumps(value, separators=(",", ":")) if isinstance(value, (list, dict)) else str(value)


def plan_sweep(config, sweep_dir, overrides, root, seeds=0, base=None):
    """-> [(run folder, [--key=value, ...], resolved config)] for every point of the grid; `base`
    is the named config the overrides apply to (default: the root)."""
    grid = expand_grid(overrides, root, seeds)
    varying = {key for key in grid[0] if len({_text(point[key]) for point in grid}) > 1}
    runs = []
    for point in grid:
        arguments = [f"--{key}={_text(value)}" for key, value in point.items()]
        runs.append((Path(sweep_dir) / point_name(point, varying), arguments, {**(base or root), **point}))
    names = [path.name for path, _, _ in runs]
    if len(set(names)) != len(names):
        raise UsageError("two grid points would share a folder: give each value only once")
    return runs


def is_finished(run_dir, expected_config):
    """Finished with exactly this config; anything else (a raised n_epochs, a changed key) goes to the
    runner, which trains further, resumes, or refuses with the reason."""
    try:
        status = json.loads((Path(run_dir) / "status.json").read_text())
        saved = json.loads((Path(run_dir) / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return bool(status.get("finished")) and saved == expected_config


class TrainingJob:
    """What submitit runs for one point: the runner in a subprocess, requeued after a time-out or preemption."""

    def __init__(self, config, save_path, arguments, environment=None):
        """`environment`: variables to set (a value) or unset (None) for the run, over the job's own."""
        self.config, self.save_path, self.arguments = config, str(save_path), list(arguments)
        self.environment = dict(environment or {})
        self._process = self._waiter = None

    def command(self):
        return [sys.executable, str(TRAIN_SCRIPT), self.config, self.save_path, *self.arguments]

    def start(self):
        """Start the run; a thread waits for it, so that the main thread, where submitit's signal handler
        runs, never sits inside Popen.wait (whose lock a handler calling wait again would deadlock on)."""
        env = dict(os.environ)
        for name, value in self.environment.items():
            if value is None:
                env.pop(name, None)
            else:
                env[name] = value
        self._process = subprocess.Popen(self.command(), env=env)
        self._waiter = threading.Thread(target=self._process.wait, daemon=True)
        self._waiter.start()

    def __call__(self):
        self.start()
        while self._waiter.is_alive():
            self._waiter.join(0.5)
        code = self._process.returncode
        if code != 0:
            raise RuntimeError(f"{' '.join(self.command())} exited with {code}; see {self.save_path}/stderr.log")
        return self.save_path

    def checkpoint(self, *args, **kwargs):
        """Called by submitit on its time-out/preemption signal: let the run checkpoint, then requeue it."""
        import submitit

        if self._process is not None and self._process.returncode is None:
            self._process.send_signal(signal.SIGUSR2)  # the runner finishes its step and checkpoints
            self._waiter.join()
        return submitit.helpers.DelayedSubmission(TrainingJob(self.config, self.save_path, self.arguments,
                                                              self.environment))

    def __getstate__(self):
        return {"config": self.config, "save_path": self.save_path, "arguments": self.arguments,
                "environment": self.environment, "_process": None, "_waiter": None}


def slurm_parameters(name, partition=None, time_min=60, gpus=0, cpus=4, mem_gb=16, array_parallelism=8):
    """submitit's `update_parameters` for a Slurm job array of single-task jobs."""
    parameters = {
        "slurm_job_name": name,
        "timeout_min": time_min,
        "cpus_per_task": cpus,
        "mem_gb": mem_gb,
        "tasks_per_node": 1,
        "nodes": 1,
        "slurm_array_parallelism": array_parallelism,
        "slurm_signal_delay_s": 120,  # time to finish a step and write a checkpoint before the kill
        "slurm_additional_parameters": {"requeue": True},
    }
    if gpus:
        parameters["gpus_per_node"] = gpus
    if partition:
        parameters["slurm_partition"] = partition
    return parameters


def make_executor(backend, sweep_dir, parameters):
    import submitit

    folder = Path(sweep_dir) / ".submitit" / "%j"
    if backend == "slurm":  # requeued after every time-out until the run is finished, however many it takes
        executor = submitit.AutoExecutor(folder=folder, cluster="slurm", slurm_max_num_timeout=UNLIMITED)
        executor.update_parameters(**parameters)
    else:  # local runs have no time limit: one week per attempt, then a checkpoint and a restart
        executor = submitit.LocalExecutor(folder=folder, max_num_timeout=UNLIMITED)
        executor.update_parameters(timeout_min=60 * 24 * 7)
    return executor


def run_local(jobs_to_run, executor, max_parallel, say=print):
    """Submit at most `max_parallel` jobs at a time; -> {save_path: error text or None}."""
    pending, running, outcome = list(jobs_to_run), [], {}
    while pending or running:
        while pending and len(running) < max_parallel:
            job = pending.pop(0)
            running.append((job, executor.submit(job)))
            say(f"started {job.save_path}")
        still = []
        for job, handle in running:
            if handle.done():
                outcome[job.save_path] = _error_of(handle)
                say(f"{'done' if outcome[job.save_path] is None else 'FAILED'}: {job.save_path}")
            else:
                still.append((job, handle))
        running = still
        time.sleep(0.2)
    return outcome


def run_slurm(jobs_to_run, executor, say=print):
    """One job array; waits for it, so the final table can be printed (Ctrl-C leaves the jobs running)."""
    with executor.batch():
        handles = [executor.submit(job) for job in jobs_to_run]
    say(f"submitted job array {handles[0].job_id.split('_')[0]} with {len(handles)} runs")
    return {job.save_path: _error_of(handle) for job, handle in zip(jobs_to_run, handles, strict=True)}


def _error_of(handle):
    try:
        handle.result()
        return None
    except Exception as e:  # submitit re-raises the job's failure with its traceback as text
        return str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
