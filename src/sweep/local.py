"""Running a sweep's jobs on this machine through submitit's LocalExecutor (or building the Slurm executor):
at most `max_parallel` at once, each on its own group of GPUs, stopped with a checkpoint on a signal.
"""
import os
import signal
import time
from pathlib import Path

from src.errors import UsageError
from src.sweep.jobs import point_outcome, signal_name

UNLIMITED = 10**6


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


def local_gpu_groups(options):
    """With --gpus_per_job=K, the groups of K visible GPUs, one per local job running at once (with
    --max_parallel, at most that many); none without GPUs, where the sweep runs as without the option."""
    if not options.gpus_per_job:
        return []
    gpus = visible_gpus()
    groups = gpu_groups(options.gpus_per_job, gpus)[:options.max_parallel or None]
    if groups:
        print(f"{len(gpus)} GPUs visible: {len(groups)} jobs at a time, each on {options.gpus_per_job} of its own")
    else:
        print(f"--gpus_per_job={options.gpus_per_job}: no GPU visible, so the runs share this machine's CPUs")
    return groups


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


def run_local(jobs_to_run, executor, max_parallel, finished, say=print, gpu_groups=(), ended=None):
    """Submit at most `max_parallel` jobs at a time, or with `gpu_groups`, one per free group, whose GPUs
    alone the job's run sees -> ({save_path: error text or None}, the stopping signal or None). A job
    succeeded when `finished(save_path)` says its run folder is finished. `jobs_to_run` may be an iterator,
    asked for the next job only when one can start (a search draws its next trial then); `ended(job, error)`
    is called as each job ends, before the next is asked for.

    On SIGTERM/SIGINT, each running job's controller gets SIGTERM, which submitit passes to the job and the
    job, once, to its run; repeated every second, since a process still starting may not have its
    handler yet."""
    pending, running, outcome, passed_on = iter(jobs_to_run), [], {}, 0.0
    free = [",".join(group) for group in gpu_groups] or [None] * max_parallel
    with SweepStop() as stop:
        while pending is not None or running:
            if stop.signal_number is not None:
                pending = None
                if time.monotonic() - passed_on >= 1:
                    for _, handle, _ in running:
                        handle._process.send_signal(signal.SIGTERM)  # submitit's controller forwards SIGTERM
                    passed_on = time.monotonic()
            while pending is not None and free:
                job = next(pending, None)
                if job is None:
                    pending = None
                    break
                gpus = free.pop(0)
                if gpus is not None:
                    job.environment["CUDA_VISIBLE_DEVICES"] = gpus
                running.append((job, submit_shielded(executor, job), gpus))
                say(f"started {job.save_path}" + (f" on GPUs {gpus}" if gpus is not None else ""))
            still = []
            for job, handle, gpus in running:
                if handle.done():
                    outcome[job.save_path] = _error_of(job, handle, finished)
                    say(f"{'done' if outcome[job.save_path] is None else 'FAILED'}: {job.save_path}")
                    if ended is not None:
                        ended(job, outcome[job.save_path])
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
