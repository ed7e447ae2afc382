"""The run folder SAVE_PATH/: what is in it, and the rules for reusing it.

    config.json       the resolved config
    meta.json         how, where and with what each session of the run was started
    log.jsonl         one JSON row per finished epoch
    status.json       epochs_done, iterations_done, finished, ...
    checkpoints/      checkpoint_<iteration>.pt, the two newest
    best_model.pt     weights with the best validation accuracy so far
    curves.png        learning curves, redrawn after every epoch
    tensorboard/      TensorBoard event files
    stdout.log, stderr.log   copies of what the runs printed
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

CONFIG, META, LOG, STATUS = "config.json", "meta.json", "log.jsonl", "status.json"
CHECKPOINTS, BEST_MODEL = "checkpoints", "best_model.pt"
# Keys that may change when a run is resumed: they decide how long to train and how often to save or
# log, not what is computed. n_epochs may grow to train further (a cosine or linear schedule then
# stretches to the new end).
RESUMABLE_CHANGES = ("n_epochs", "checkpoint_every_n_batches", "checkpoint_every_seconds", "tensorboard")


class RunFolder:
    def __init__(self, path):
        self.path = Path(path)
        self.checkpoints = self.path / CHECKPOINTS
        self._lock = RunFolderLock(self.path)

    def __enter__(self):
        """Create the folder and take it for this process (exit 1 if another one has it)."""
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

    def check_config(self, config):
        """Refuse a config that differs from the saved one: resuming with other settings would mix two runs."""
        saved_path = self.path / CONFIG
        if saved_path.exists():
            try:
                saved = read_json(saved_path)
            except ValueError:
                raise RunError(f"{saved_path} is damaged (not valid JSON); fix or remove it") from None
            changed = [k for k in diff_keys(saved, config) if k not in RESUMABLE_CHANGES]
            if changed:
                details = ", ".join(f"{k}: {saved.get(k)!r} -> {config.get(k)!r}" for k in changed)
                raise UsageError(
                    f"{self.path} holds a run with a different config ({details}); "
                    "use a new SAVE_PATH, or the same settings to resume"
                )

    def save_config(self, config):
        write_json(self.path / CONFIG, config)

    def read_status(self):
        try:
            return read_json(self.path / STATUS)
        except (OSError, ValueError):
            return None

    def write_progress(self, log, status):
        text = "".join(json.dumps(row) + "\n" for row in log)
        atomic_write(self.path / LOG, lambda f: f.write(text.encode()))
        write_json(self.path / STATUS, status)

    def record_session(self, device, precision, world_size=1):
        """Append this session (command, commit, host, versions, device) to meta.json."""
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
            "precision": precision,
            "threads": torch.get_num_threads(),
            "processes": world_size,
            "start_time": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "pid": os.getpid(),
        }
        meta_path = self.path / META
        try:
            previous = read_json(meta_path).get("sessions", []) if meta_path.exists() else []
        except ValueError:
            previous = []  # a damaged history is not worth stopping a run for
        if previous and (previous[-1]["device"], previous[-1]["precision"]) != (session["device"], precision):
            print(f"warning: this run was on {previous[-1]['device']} ({previous[-1]['precision']}) and goes on "
                  f"on {session['device']} ({precision}); it will not match an uninterrupted run bit for bit")
        write_json(meta_path, {**session, "sessions": previous + [session]})

    @contextlib.contextmanager
    def copy_output(self):
        """Inside, what this process prints also goes to stdout.log and stderr.log."""
        saved = sys.stdout, sys.stderr
        sys.stdout = Tee(sys.stdout, self.path / "stdout.log")
        sys.stderr = Tee(sys.stderr, self.path / "stderr.log")
        try:
            yield
        finally:
            copies = sys.stdout, sys.stderr
            sys.stdout, sys.stderr = saved
            for tee in copies:
                tee.file.close()


def git_commit():
    """The commit of the code that ran, with '+dirty' when it had uncommitted changes."""
    root = Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                                timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return (commit + ("+dirty" if dirty else "")) or None


class Tee:
    """A text stream that writes to the terminal and appends to a file."""

    def __init__(self, stream, path):
        self.stream = stream
        self.file = open(path, "a", buffering=1)

    def write(self, text):
        self.stream.write(text)
        try:
            self.file.write(text)
        except OSError:
            pass  # a full disk must not turn a print into a crash; the checkpoint writes report it
        return len(text)

    def flush(self):
        self.stream.flush()
        try:
            self.file.flush()
        except OSError:
            pass

    def isatty(self):
        return self.stream.isatty()

    def __getattr__(self, name):
        return getattr(self.stream, name)
