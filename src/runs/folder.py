"""The run folder SAVE_PATH/ (its files: src/runs/names.py): creating and taking it, the rules for reusing
it, and writing its config, progress and sessions; `is_finished`, the one rule for "finished".
"""
import contextlib
import datetime
import json
import os
import platform
import socket
import subprocess
import sys
from pathlib import Path

from src.config import diff_keys
from src.errors import RunError, UsageError
from src.files import RunFolderLock, atomic_write, read_json, remove_stale_temporaries, write_json
from src.runs.names import (  # noqa: F401  (the names: public here too, as before they had a module)
    BEST_MODEL, CHECKPOINTS, CONFIG, LOG, META, PROGRESS_FILES, RUN_FILE_NAMES, RUN_FILE_PREFIXES, STATUS, STDERR,
    STDOUT,
)
from src.runs.reading import UnreadableRun, read_status

# Keys that may change when a run is resumed: they decide how long to train and how often to save or
# log, not what is computed. n_epochs may grow to train further (a cosine or linear schedule then
# stretches to the new end).
RESUMABLE_CHANGES = ("n_epochs", "checkpoint_every_n_batches", "checkpoint_every_seconds", "tensorboard",
                     "plot_every_seconds")

def is_finished(status, n_epochs):
    """The one rule for "finished", used by the loop, a rerun, sweeps, evaluate.py and the run table.

    The loop records `finished` in status.json (see `ends_run`); a run that ended by its epochs opens
    again when `n_epochs` is raised above what it did, one that an extension ended for good (early
    stopping, `finished_early`) does not.
    """
    if not isinstance(status, dict) or status.get("finished") is not True:
        return False
    done = status.get("epochs_done")
    return status.get("finished_early") is True or not (type(done) is int and done < n_epochs)


def ends_run(epochs_done, finished_early, n_epochs):
    """What the loop writes as `finished`: all `n_epochs` done, or ended for good by an extension."""
    return finished_early or epochs_done >= n_epochs


class RunFolder:
    def __init__(self, path):
        self.given = str(path)  # Path("") would be "." (the current folder): keep what the user typed
        self.path = Path(path)
        self.checkpoints = self.path / CHECKPOINTS
        self._lock = RunFolderLock(self.path)

    def __enter__(self):
        """Create the folder and take it for this process (exit 1 if another one has it)."""
        if not self.given.strip():
            raise UsageError("SAVE_PATH is empty; give the run folder a name, e.g. results/my_run")
        self.refuse_foreign_folder()
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            self._lock.acquire()
            self.checkpoints.mkdir(exist_ok=True)
        except OSError as e:
            raise RunError(f"cannot use {self.path} as a run folder ({e.strerror or e})") from None
        remove_stale_temporaries(self.path)
        remove_stale_temporaries(self.checkpoints)
        return self

    def __exit__(self, *exc):
        self._lock.release()

    def refuse_foreign_folder(self):
        """An existing folder of other files is not adopted: the run would mix with them (and delete its .tmp-*)."""
        try:
            names = [p.name for p in self.path.iterdir()] if self.path.is_dir() else []
        except OSError as e:
            raise RunError(f"cannot use {self.path} as a run folder ({e.strerror or e})") from None
        if CONFIG in names:
            return
        foreign = sorted(n for n in names if n not in RUN_FILE_NAMES and not n.startswith(RUN_FILE_PREFIXES))
        if foreign:
            shown = ", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else "")
            raise UsageError(f"{self.path} already holds files that are not a run's ({shown}); "
                             "give a new or empty folder as SAVE_PATH")

    def has_checkpoints(self):
        """Any checkpoint file, whole, damaged or set aside: the run has saved work."""
        return self.checkpoints.is_dir() and any(p.name.startswith("checkpoint_") for p in self.checkpoints.iterdir())

    def has_progress(self):
        return any((self.path / name).exists() for name in PROGRESS_FILES)

    def refuse_lost_checkpoints(self):
        """Progress files without any checkpoint: starting afresh would overwrite a run's results."""
        if self.has_progress() and not self.has_checkpoints():
            results = ", ".join(name for name in PROGRESS_FILES if (self.path / name).exists())
            raise RunError(f"{self.path} holds a run's results ({results}) but no checkpoint in {self.checkpoints}; "
                           "it never restarts by itself: move the folder aside (or restore its checkpoints) and rerun")

    def check_config(self, config, registry):
        """Refuse a config that differs from the saved one: resuming with other settings would mix two runs.

        Keys the family's root gained since the run started take their root value (the behaviour the
        run had), said in one line; config.json is rewritten with them once the start-up checks pass.
        A folder with no checkpoint and no results yet (a start that failed, say on a wrong --device)
        takes the new config: nothing was computed with the old one.
        """
        saved_path = self.path / CONFIG
        if not (saved_path.exists() and (self.has_checkpoints() or self.has_progress())):
            return
        try:
            saved = read_json(saved_path)
        except (ValueError, RecursionError):
            raise RunError(f"{saved_path} is damaged (not valid JSON); fix or remove it") from None
        if not isinstance(saved, dict):
            raise RunError(f"{saved_path} is damaged (not a JSON object of key: value); fix or remove it")
        saved, filled = registry.complete(saved, where=saved_path)
        changed = [k for k in diff_keys(saved, config) if k not in RESUMABLE_CHANGES]
        if changed:
            details = ", ".join(f"{k}: {saved.get(k)!r} -> {config.get(k)!r}" for k in changed)
            raise UsageError(f"{self.path} holds a run with a different config ({details}); "
                             "use a new SAVE_PATH, or the same settings to resume")
        if filled:
            print(f"{saved_path} predates the keys {', '.join(filled)}: they take their default values, which "
                  "keep the run's behaviour, and are added to it")

    def save_config(self, config):
        write_json(self.path / CONFIG, config)

    def read_status(self):
        """status.json, or None when it is missing or damaged (the resume rebuilds it from the checkpoint)."""
        try:
            status = read_status(self.path)
        except (OSError, UnreadableRun):
            return None
        return status if status is not None and type(status.get("epochs_done")) is int else None

    def write_progress(self, log, status):
        text = "".join(json.dumps(row) + "\n" for row in log)
        atomic_write(self.path / LOG, lambda f: f.write(text.encode()))
        write_json(self.path / STATUS, status)

    def record_session(self, device, kernels, world_size=1, size=None):
        """Append this session (command, commit, host, versions, device; `kernels`, the precision and memory
        format with how they were chosen, from `src.training.kernels.Kernels.record`; the model's `size`, from
        `src.networks.size.model_size`: parameters and MACs per image) to meta.json."""
        import ignite
        import torch

        session = {
            "command": " ".join([sys.executable] + sys.argv),
            "git_commit": git_commit(),
            "host": socket.gethostname(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "ignite": ignite.__version__,
            "device": str(device),
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
            **kernels,
            "threads": torch.get_num_threads(),
            "processes": world_size,
            "start_time": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "pid": os.getpid(),
            **(size or {}),
        }
        previous = self.read_sessions()
        precision = kernels["precision"]
        last = (previous[-1].get("device"), previous[-1].get("precision")) if previous else None
        if last and last != (session["device"], precision):
            print(f"warning: this run was on {last[0]} ({last[1]}) and goes on "
                  f"on {session['device']} ({precision}); it will not match an uninterrupted run bit for bit")
        write_json(self.path / META, {**session, "sessions": previous + [session]})

    def read_sessions(self):
        """The sessions recorded in meta.json; a damaged history is not worth stopping a run for."""
        try:
            sessions = read_json(self.path / META).get("sessions", [])
        except (OSError, ValueError, RecursionError, AttributeError):
            return []
        return [s for s in sessions if isinstance(s, dict)] if isinstance(sessions, list) else []

    @contextlib.contextmanager
    def copy_output(self):
        """Inside, what this process prints also goes to stdout.log and stderr.log."""
        saved = sys.stdout, sys.stderr
        sys.stdout = Tee(sys.stdout, self.path / STDOUT)
        sys.stderr = Tee(sys.stderr, self.path / STDERR)
        try:
            yield
        finally:
            copies = sys.stdout, sys.stderr
            sys.stdout, sys.stderr = saved
            for tee in copies:
                with contextlib.suppress(OSError):  # what a full disk kept out of the file is lost, as in Tee.write
                    tee.file.close()


def git_commit():
    """The commit of the code that ran, with '+dirty' when it had uncommitted changes."""
    root = Path(__file__).resolve().parents[2]
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                                timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return (commit + ("+dirty" if dirty else "")) or None


class Tee:
    """A text stream that writes to the terminal and appends to a file.

    A terminal that went away (a closed window, `| head -1`, an ssh session that dropped) stops the
    printing, not the training: the file keeps everything, and the dead stream's descriptor is
    pointed at /dev/null so that Python's own flush at exit cannot fail on it either.
    """

    def __init__(self, stream, path):
        self.stream = stream
        self.file = open(path, "a", buffering=1)
        self.stream_alive = True

    def write(self, text):
        self._to_stream(lambda: self.stream.write(text))
        try:
            self.file.write(text)
        except OSError:
            pass  # a full disk must not turn a print into a crash; the checkpoint writes report it
        return len(text)

    def flush(self):
        self._to_stream(self.stream.flush)
        try:
            self.file.flush()
        except OSError:
            pass

    def _to_stream(self, action):
        if not self.stream_alive:
            return
        try:
            action()
        except (OSError, ValueError):  # EPIPE, EIO after a hang-up, or a closed file object
            self.stream_alive = False
            silence(self.stream)

    def isatty(self):
        return self.stream_alive and self.stream.isatty()

    def __getattr__(self, name):
        return getattr(self.stream, name)


def silence(stream):
    """Point the descriptor under `stream` at /dev/null: later writes (ours, tqdm's, Python's at exit) vanish."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, stream.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):
        pass
