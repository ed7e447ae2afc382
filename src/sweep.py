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
import math
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from src.config import check_known_key, parse_value
from src.errors import UsageError

TRAIN_SCRIPT = Path(__file__).resolve().parent / "scripts" / "train_simple_CNN.py"
PLAN = "sweep.json"
UNLIMITED = 10**6
MAX_POINTS = 10000  # a sweep folder of more runs than this is a typo, not an experiment


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
        size = math.prod(len(values) for values in axes.values()) * seeds
        if size > MAX_POINTS:  # checked before the seeds are listed: --seeds=10**9 would fill the memory
            raise UsageError(f"the grid would have {size} points; at most {MAX_POINTS} (a typo in --seeds?)")
        axes["seed"] = list(range(1, seeds + 1))
    size = math.prod(len(values) for values in axes.values())
    if size > MAX_POINTS:
        raise UsageError(f"the grid would have {size} points; at most {MAX_POINTS}: split it into several sweeps")
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
    """Finished with exactly this config (an older config.json completed with the keys added since, as a
    resume would); anything else (a raised n_epochs, a changed key) goes to the runner, which trains
    further, resumes, or refuses with the reason."""
    from src.analysis import read_config, read_object
    from src.run_folder import STATUS
    from src.run_folder import is_finished as finished

    try:
        status = read_object(Path(run_dir) / STATUS)
        saved = read_config(run_dir)
    except (OSError, ValueError):  # missing or unreadable (src.analysis.UnreadableRun): the runner says which
        return False
    return finished(status, saved["n_epochs"]) and saved == expected_config


class RunFailed(Exception):
    """A point's run ended without finishing; the message is the runner's own one-line reason."""


# How a RunFailed reads in the traceback submitit hands back to the sweep.
RUN_FAILED = f"{RunFailed.__module__}.{RunFailed.__qualname__}: "


class TrainingJob:
    """What submitit runs for one point: the runner in a subprocess, requeued after a time-out or preemption.

    SIGTERM or SIGINT to the job (from the sweep, Slurm or a terminal) is passed on to the run as SIGTERM,
    once, and the job waits for the run to finish its step, checkpoint and exit. SIGTERM, since a run
    that got the terminal's SIGINT itself ignores it, where a second SIGINT would make it exit at once.
    """

    runner = str(TRAIN_SCRIPT)  # jobs pickled before families had runners of their own were simple CNNs

    def __init__(self, config, save_path, arguments, environment=None, runner=TRAIN_SCRIPT):
        """`environment`: variables to set (a value) or unset (None) for the run, over the job's own;
        `runner`: the family's training script."""
        self.config, self.save_path, self.arguments = config, str(save_path), list(arguments)
        self.environment, self.runner = dict(environment or {}), str(runner)
        self._process = self._waiter = self._stderr = self._stop_signal = None
        self._copied = 0  # bytes of the run's stderr already copied to the job's
        self._passed_on = False  # whether the run got its SIGTERM

    def command(self):
        return [sys.executable, self.runner, self.config, self.save_path, *self.arguments]

    def start(self):
        """Start the run; a thread waits for it, so that the main thread, where submitit's signal handler
        runs, never sits inside Popen.wait (whose lock a handler calling wait again would deadlock on).
        The run's stderr goes to a file (a pipe would break if this job died first) that the thread copies
        to the job's stderr as it grows, and that gives the run's last `error: ...` line in the end."""
        env = dict(os.environ)
        for name, value in self.environment.items():
            if value is None:
                env.pop(name, None)
            else:
                env[name] = value
        self._stderr, self._copied = tempfile.TemporaryFile(), 0
        self._process = subprocess.Popen(self.command(), env=env, stderr=self._stderr)
        self._waiter = threading.Thread(target=self._wait, daemon=True)
        self._waiter.start()

    def _wait(self):
        while self._process.poll() is None:
            self._copy_stderr()
            time.sleep(0.2)
        self._copy_stderr()

    def _copy_stderr(self):
        """What the run wrote to stderr since the last call, on to the job's stderr (pread: the run's offset stays)."""
        while chunk := os.pread(self._stderr.fileno(), 1 << 16, self._copied):
            self._copied += len(chunk)
            try:
                sys.stderr.flush()  # what the job itself printed goes first
                sys.stderr.buffer.write(chunk)
                sys.stderr.buffer.flush()
            except (OSError, ValueError, AttributeError):
                pass  # the job's own stderr is gone or odd: the run's stderr.log still has it all

    def __call__(self):
        previous = {number: signal.signal(number, self._pass_on) for number in (signal.SIGTERM, signal.SIGINT)}
        try:
            if self._stop_signal is None:
                self.start()
                if self._stop_signal is not None:  # it came while the run was being started
                    self._pass_on(self._stop_signal, None)
                while self._waiter.is_alive():
                    self._waiter.join(0.5)
        finally:
            for number, handler in previous.items():
                signal.signal(number, handler)
        if self._process is None:
            raise RunFailed(f"stopped by {signal_name(self._stop_signal)} before the run started; "
                            "rerun the sweep to run it")
        if self._process.returncode != 0:
            raise RunFailed(self.failure())
        return self.save_path

    def _pass_on(self, number, frame):
        """SIGTERM or SIGINT to this job: the run checkpoints and exits. Only once: a repeat reaching the run
        after its loop had ended (its handler gone) would kill it during its exit."""
        self._stop_signal = number
        if self._process is not None and not self._passed_on:
            self._passed_on = True
            self._process.send_signal(signal.SIGTERM)

    def failure(self):
        """One line saying why the run did not finish: its last `error: ...` line, or how it ended."""
        code = self._process.returncode
        if code < 0 or 128 < code < 128 + 65:  # killed by a signal, or stopped by one with a checkpoint
            name = signal_name(-code if code < 0 else code - 128)
            return f"ended by {name}; rerun the sweep to resume it"
        lines = [line.strip() for line in tail_lines(self._stderr)]
        reason = last_error(lines)
        if reason is not None:
            return reason
        last = f": {lines[-1][:200]}" if lines else ""
        return f"the run exited with {code}{last} (see {self.save_path}/stderr.log)"

    def checkpoint(self, *args, **kwargs):
        """Called by submitit on its time-out/preemption signal: let the run checkpoint, then requeue it."""
        import submitit

        if self._process is not None and self._process.returncode is None:
            self._process.send_signal(signal.SIGUSR2)  # the runner finishes its step and checkpoints
            self._waiter.join()
        return submitit.helpers.DelayedSubmission(TrainingJob(self.config, self.save_path, self.arguments,
                                                              self.environment, self.runner))

    def __getstate__(self):
        return {"config": self.config, "save_path": self.save_path, "arguments": self.arguments,
                "environment": self.environment, "runner": self.runner, "_process": None, "_waiter": None,
                "_stderr": None, "_stop_signal": None, "_copied": 0, "_passed_on": False}


def signal_name(number):
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def visible_gpus():
    """The GPUs this process may use: CUDA_VISIBLE_DEVICES's entries where it is set (up to the first
    negative one, where CUDA stops too), else every device torch finds."""
    text = os.environ.get("CUDA_VISIBLE_DEVICES")
    if text is None:
        import torch

        return [str(index) for index in range(torch.cuda.device_count())]
    entries = []
    for entry in (part.strip() for part in text.split(",")):
        if not entry or entry.startswith("-"):
            break
        entries.append(entry)
    return entries


def gpu_groups(gpus_per_job, gpus):
    """Disjoint groups of `gpus_per_job` of `gpus`, one per local job running at once; none without GPUs."""
    if not gpus_per_job or not gpus:
        return []
    if gpus_per_job > len(gpus):
        raise UsageError(f"--gpus_per_job={gpus_per_job} but only {len(gpus)} GPUs are visible "
                         f"(CUDA_VISIBLE_DEVICES={','.join(gpus)})")
    return [gpus[i:i + gpus_per_job] for i in range(0, len(gpus) - gpus_per_job + 1, gpus_per_job)]


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


class SweepStop:
    """SIGTERM or SIGINT to a local sweep: start nothing more, pass the signal on to the running jobs, wait
    for their runs to checkpoint and exit, then exit 128 + N. A second SIGINT exits at once, without
    waiting (from a terminal, the runs get it too, and exit at once themselves)."""

    def __init__(self):
        self.signal_number = None
        self._previous = {}

    def __enter__(self):
        self._previous = {n: signal.signal(n, self._handle) for n in (signal.SIGTERM, signal.SIGINT)}
        return self

    def __exit__(self, *exc):
        for number, handler in self._previous.items():
            signal.signal(number, handler)

    def _handle(self, number, frame):
        name = signal_name(number)
        if self.signal_number is not None:
            if number == signal.SIGINT:
                _say(f"\n{name} again: exiting now, without waiting for the runs\n")
                os._exit(128 + number)
            return
        self.signal_number = number
        _say(f"\n{name}: stopping the running points (each writes a checkpoint), then exiting "
             "(send SIGINT again to exit at once)\n")


def _say(text):
    """Straight to file descriptor 2: a handler that used sys.stderr could re-enter a write in progress."""
    try:
        os.write(2, text.encode())
    except OSError:
        pass


def submit_shielded(executor, job):
    """Submit with SIGINT ignored, which the job's processes inherit: a terminal's Ctrl-C then reaches the
    run (which checkpoints), its job and this sweep (which pass it on), but not submitit's controller,
    which would kill the job a second later, before its run had written its checkpoint."""
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        return executor.submit(job)
    finally:
        signal.signal(signal.SIGINT, previous)


def run_local(jobs_to_run, executor, max_parallel, finished, say=print, gpu_groups=()):
    """Submit at most `max_parallel` jobs at a time, or with `gpu_groups`, one per free group, whose GPUs
    alone the job's run sees -> ({save_path: error text or None}, the stopping signal or None). A job
    succeeded when `finished(save_path)` says its run folder is finished.

    On SIGTERM/SIGINT, each running job's controller gets SIGTERM, which submitit passes to the job and the
    job, once, to its run; repeated every second, since a process still starting may not have its
    handler yet."""
    pending, running, outcome, passed_on = list(jobs_to_run), [], {}, 0.0
    free = [",".join(group) for group in gpu_groups] or [None] * max_parallel
    with SweepStop() as stop:
        while pending or running:
            if stop.signal_number is not None:
                pending.clear()
                if time.monotonic() - passed_on >= 1:
                    for _, handle, _ in running:
                        handle._process.send_signal(signal.SIGTERM)  # submitit's controller forwards SIGTERM
                    passed_on = time.monotonic()
            while pending and free:
                job, gpus = pending.pop(0), free.pop(0)
                if gpus is not None:
                    job.environment["CUDA_VISIBLE_DEVICES"] = gpus
                running.append((job, submit_shielded(executor, job), gpus))
                say(f"started {job.save_path}" + (f" on GPUs {gpus}" if gpus is not None else ""))
            still = []
            for job, handle, gpus in running:
                if handle.done():
                    outcome[job.save_path] = _error_of(job, handle, finished)
                    say(f"{'done' if outcome[job.save_path] is None else 'FAILED'}: {job.save_path}")
                    free.append(gpus)
                else:
                    still.append((job, handle, gpus))
            running = still
            time.sleep(0.2)
    return outcome, stop.signal_number


def _error_of(job, handle, finished):
    """None when the local job's run finished, else one line: the reason its stderr gives, or how the job ended.

    Never from submitit's result pickle (handle.result()): the sweep folder holds it, and a file planted
    there would run code in the sweep; the run folder's status.json and the job's stderr say it all."""
    code = handle._process.returncode if handle._process is not None else None
    ended = f"by {signal_name(-code)}" if code is not None and code < 0 else None
    return point_outcome(finished(job.save_path), handle.paths.stderr, ended)


def point_outcome(finished, stderr_path, ended=None):
    """None when the point's run finished (`finished`: its run folder says so, with the config asked for),
    else one line: the reason in its job's stderr, or how the job ended (`ended`, e.g. `by SIGKILL`)."""
    if finished:
        return None
    how = f" {ended}" if ended else ""
    return stderr_reason(stderr_path) or f"its job ended{how} without finishing the run; rerun the sweep to resume it"


def stderr_reason(stderr_path):
    """The reason a job's stderr gives for its end, in one line, or None: Slurm's (time limit, cancelled, node
    failure), else our RunFailed's (the run's own reason, raised by the job), else the run's last `error: ...`
    line, else the exception line of the job's last traceback."""
    try:
        with open(stderr_path, "rb") as file:
            raw = tail_lines(file)
    except OSError:
        return None
    lines = [line.strip() for line in raw]
    for line in reversed(lines):
        if "***" in line:  # slurmstepd: error: *** JOB 12 ON node CANCELLED AT ... DUE TO TIME LIMIT ***
            return f"Slurm: {line.split('***')[1].strip()}; rerun the sweep to resume it"
    for line in reversed(lines):
        if line.startswith(RUN_FAILED):
            return line[len(RUN_FAILED):]
    reason = last_error(lines)
    if reason is not None:
        return reason
    tracebacks = [i for i, line in enumerate(raw) if line.startswith("Traceback (most recent call last)")]
    if tracebacks:  # its exception is the first unindented line after the frames
        return next((line[:300] for line in raw[tracebacks[-1] + 1:] if not line[0].isspace()), None)
    return None


def tail_lines(file):
    """The non-empty lines (right-stripped: a traceback's indentation kept) of the last 64 KiB of an open file:
    a long run's log can be large, and its end says how it ended."""
    size = os.fstat(file.fileno()).st_size
    tail = os.pread(file.fileno(), 1 << 16, max(0, size - (1 << 16))).decode(errors="replace")
    return [line.rstrip() for line in tail.splitlines() if line.strip()]


def last_error(lines):
    """The reason in the last `error: ...` line the runner printed (its one-line errors), or None."""
    errors = [line[len("error: "):] for line in lines if line.startswith("error: ")]
    return errors[-1] if errors else None


def __getattr__(name):
    """`src.sweep.slurm_parameters` and `check_slurm`, as imported before they moved to src.sweep_slurm."""
    if name in ("slurm_parameters", "check_slurm"):
        from src import sweep_slurm

        return getattr(sweep_slurm, name)
    raise AttributeError(f"module 'src.sweep' has no attribute '{name}'")
