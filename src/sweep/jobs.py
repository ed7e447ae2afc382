"""A sweep's job: one point's run executed by submitit (TrainingJob), and how its end is read back.

Every point is the ordinary runner (`train_simple_CNN.py CONFIG SAVE_PATH --key=value ...`) in a
subprocess of a submitit job, so a sweep's run behaves exactly like a run started by hand:
rerunning the sweep skips finished points and resumes the others. On Slurm's time-out or
preemption warning (SIGUSR2, `signal_delay_s` before the end), submitit calls the job's
`checkpoint()`: it passes the signal on to the runner, which checkpoints and exits, and submitit
requeues the job, which then resumes the run.
"""
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

TRAIN_SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "train_simple_CNN.py"


class RunFailed(Exception):
    """A point's run ended without finishing; the message is the runner's own one-line reason."""


# How a point that may simply go on ends its reason: it was stopped or killed, not failed by itself.
RESUME, RUN = "rerun the sweep to resume it", "rerun the sweep to run it"


def resumable(reason):
    """Whether a point's one-line reason says it was stopped or killed (to resume), not failed by its run."""
    return reason.endswith((RESUME, RUN))


# How a RunFailed reads in the traceback submitit hands back to the sweep.
RUN_FAILED = f"{RunFailed.__module__}.{RunFailed.__qualname__}: "
RUN_FAILED_BEFORE = "src.sweep.RunFailed: "  # how it read before src.sweep became a package (jobs that ended then)


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
            raise RunFailed(f"stopped by {signal_name(self._stop_signal)} before the run started; {RUN}")
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
            return f"ended by {name}; {RESUME}"
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


def point_outcome(finished, stderr_path, ended=None):
    """None when the point's run finished (`finished`: its run folder says so, with the config asked for),
    else one line: the reason in its job's stderr, or how the job ended (`ended`, e.g. `by SIGKILL`)."""
    if finished:
        return None
    how = f" {ended}" if ended else ""
    return stderr_reason(stderr_path) or f"its job ended{how} without finishing the run; {RESUME}"


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
            return f"Slurm: {line.split('***')[1].strip()}; {RESUME}"
    for line in reversed(lines):
        for prefix in (RUN_FAILED, RUN_FAILED_BEFORE):
            if line.startswith(prefix):
                return line[len(prefix):]
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
