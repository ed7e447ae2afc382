"""Checkpoints: written by ignite's `Checkpoint` through an atomic saver, read back safely.

Files are `checkpoints/checkpoint_<iteration>.pt`; the two newest are kept, so the previous one
stays until the new one is whole. Loading uses `torch.load(weights_only=True)`: a file in a run
folder can hold tensors and plain containers only, never code.
"""
import re
from pathlib import Path

from ignite.handlers.checkpoint import BaseSaveHandler

from src.files import atomic_write

CHECKPOINT_NAME = re.compile(r"^checkpoint_(\d+)\.pt$")


class AtomicDiskSaver(BaseSaveHandler):
    """ignite save handler: temporary file, fsync, rename, fsync of the folder."""

    def __init__(self, folder):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)

    def __call__(self, checkpoint, filename, metadata=None):
        save_tensors(checkpoint, self.folder / filename)

    def remove(self, filename):
        (self.folder / filename).unlink(missing_ok=True)


def save_tensors(obj, path):
    import torch

    atomic_write(path, lambda f: torch.save(obj, f))


def checkpoint_iteration(path):
    match = CHECKPOINT_NAME.match(Path(path).name)
    return int(match.group(1)) if match else None


def list_checkpoints(folder):
    """Checkpoint files in `folder`, newest (highest iteration) first."""
    found = [p for p in Path(folder).glob("checkpoint_*.pt") if checkpoint_iteration(p) is not None]
    return sorted(found, key=checkpoint_iteration, reverse=True)


def load_tensors(path):
    """Load a file written by `save_tensors`; anything else (corrupt, truncated, a planted pickle) raises."""
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, MemoryError):
        raise  # the disk or the machine failed, not the file: never set a checkpoint aside for that
    except Exception as e:  # torch raises many types for damaged files; all mean "not usable"
        raise CorruptCheckpoint(f"{path} is corrupt ({type(e).__name__}: {str(e).splitlines()[0][:120]})") from None


class CorruptCheckpoint(Exception):
    pass


def load_newest(folder, required_keys=(), warn=print, set_aside=False):
    """(path, contents) of the newest whole checkpoint, or None when there is none at all.

    A damaged newest file is reported and the previous one is used; with `set_aside` (the run that
    resumes) the damaged file is renamed `*.corrupt`, kept for inspection but never loaded again.
    When files exist but none is whole, raise CorruptCheckpoint: silently starting from scratch
    would throw the run away.
    """
    paths = list_checkpoints(folder)
    problems = []
    for path in paths:
        try:
            contents = load_tensors(path)
            missing = [k for k in required_keys if k not in contents]
            if missing:
                raise CorruptCheckpoint(f"{path} is corrupt (missing {', '.join(missing)})")
        except CorruptCheckpoint as e:
            problems.append(str(e))
            warn(f"warning: {e}; trying the previous checkpoint")
            continue
        if set_aside:
            for damaged in paths[: len(problems)]:
                damaged.rename(damaged.with_name(damaged.name + ".corrupt"))
        return path, contents
    if paths:
        raise CorruptCheckpoint(
            f"no whole checkpoint in {folder}: {'; '.join(problems)}. Move the folder aside to start again"
        )
    return None
