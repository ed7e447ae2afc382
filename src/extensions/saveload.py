"""Blocks' Checkpoint and Load as one extension: load on start; save every N batches, every N seconds, at
each epoch end and at the end; the finite-value guards before every save; every rank's running sums gathered.

Under torchrun a decision to checkpoint or stop is taken by all ranks together (`agreed`).
"""
import contextlib
import time
from pathlib import Path

import torch
from ignite.engine import Events
from ignite.handlers import Checkpoint as IgniteCheckpoint

from src.runs.checkpoints import (
    AtomicDiskSaver,
    CorruptCheckpoint,
    checkpoint_iteration,
    list_checkpoints,
    load_newest,
    load_tensors,
)
from src.errors import RunError

AGREE_EVERY = 10  # under torchrun: iterations between pooled decisions to stop or checkpoint


def agreed(ranks, engine, flag, mid_epoch=True):
    """A decision every rank takes together: one process alone cannot checkpoint or stop. Under
    torchrun, mid-epoch decisions are pooled every AGREE_EVERY steps (one small collective)."""
    if ranks.world_size == 1:
        return flag
    if mid_epoch and engine.state.iteration % AGREE_EVERY:
        return False
    return ranks.any(flag)


def at_epoch_end(engine):
    return engine.state.iteration % engine.state.epoch_length == 0


@contextlib.contextmanager
def disk_errors_stop_training(folder):
    """A checkpoint that cannot be written stops the run: training on without saving would risk the work."""
    try:
        yield
    except OSError as e:
        where = e.filename or folder
        raise RunError(f"cannot write {where} ({e.strerror or e}); training stopped, the previous checkpoint "
                       "is kept; free some space (or fix the folder) and rerun the same command to resume") from None


class Checkpoint:
    """Everything with state, saved atomically (the two newest files kept) and loaded on start.

    `register(name, obj)` adds an object with `state_dict`/`load_state_dict` (an EMA, a scaler);
    such entries are optional on load, so checkpoints written before they existed still resume.
    """

    REQUIRED = ("model", "optimizer", "trainer", "progress")

    def __init__(self, loop):
        self.loop, self.folder, self.ranks = loop, loop.folder, loop.ranks
        self.config, self.progress = loop.config, loop.progress
        self.objects = {"model": loop.model, "optimizer": loop.optimizer, "trainer": loop.trainer,
                        "progress": loop.progress}
        self.saved_at = None  # (iteration, log rows) of the newest checkpoint
        self.last_save_time = time.monotonic()
        self.saver = None
        # Called before each write (rank 0): writes in flight elsewhere (curves.png) finish first, and
        # their failure (OSError) stops the run here, before a checkpoint could follow it.
        self.before_save = []

    def register(self, name, obj):
        self.objects[name] = obj

    def attach(self, engine):
        """Mid-epoch triggers on ITERATION_COMPLETED; the epoch-end save on EPOCH_COMPLETED, which must be
        attached after the handler that appends the epoch's log row, so that the checkpoint holds it."""
        self.saver = IgniteCheckpoint(self.objects, AtomicDiskSaver(self.folder.checkpoints), filename_prefix="",
                                      n_saved=2, global_step_transform=lambda e, event: e.state.iteration)
        n = self.config["checkpoint_every_n_batches"]
        if n > 0:
            engine.add_event_handler(Events.ITERATION_COMPLETED(every=n), self.save_mid_epoch)
        if self.config["checkpoint_every_seconds"] > 0:
            engine.add_event_handler(Events.ITERATION_COMPLETED, self.save_if_due)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.save)
        engine.add_event_handler(Events.COMPLETED, self.save)

    def save_mid_epoch(self, engine):
        """Checkpoints at an epoch's last step wait for EPOCH_COMPLETED, so they hold that epoch's log row."""
        if not at_epoch_end(engine):
            self.save(engine)

    def save_if_due(self, engine):
        due = time.monotonic() - self.last_save_time >= self.config["checkpoint_every_seconds"]
        if agreed(self.ranks, engine, due):
            self.save_mid_epoch(engine)

    def save(self, engine):
        here = (engine.state.iteration, len(self.progress.log))
        if self.saved_at == here:
            return
        self.check_loss_finite()
        self.check_weights_finite(engine.state.iteration)
        self.progress.all_sums = self.ranks.gather(self.progress.sums())
        if self.ranks.is_main:
            with disk_errors_stop_training(self.folder.path):
                for wait in self.before_save:
                    wait()
                self.saver(engine)
                self.folder.write_progress(self.progress.log, self.loop.status())
        self.saved_at = here
        self.last_save_time = time.monotonic()

    def last_saved(self):
        return f"iteration {self.saved_at[0]}" if self.saved_at else "none"

    def check_loss_finite(self):
        """Never checkpoint weights that a NaN or inf loss has reached; keep the last good checkpoint."""
        first_bad = self.progress.first_bad.reshape(1)
        bad = int(max(self.ranks.gather(first_bad))) if self.ranks.world_size > 1 else int(first_bad)
        if bad:
            raise RunError(f"the training loss became NaN or infinite at iteration {bad}; stopped without saving "
                           f"anything after it (last checkpoint: {self.last_saved()}); start a new SAVE_PATH with "
                           "a lower --lr")

    def check_weights_finite(self, iteration):
        """A step can push weights to inf while its own loss was still finite: check before saving them."""
        if not torch.stack([p.detach().isfinite().all() for p in self.loop.model.parameters()]).all():
            raise RunError(f"the weights became NaN or infinite at iteration {iteration}; stopped without saving "
                           f"them (last checkpoint: {self.last_saved()}); start a new SAVE_PATH with a lower --lr")

    def resume(self, batches_per_epoch):
        """Load the newest whole checkpoint into everything that has state; False when starting afresh."""
        found = self.choose()
        if found is None:
            return False
        path, contents = found
        if contents["trainer"]["epoch_length"] != batches_per_epoch:
            raise RunError(f"{path} was made with {contents['trainer']['epoch_length']} batches per epoch, the data "
                           f"now gives {batches_per_epoch}: the data set changed; use a new SAVE_PATH")
        epochs_in_checkpoint = contents["trainer"]["iteration"] // batches_per_epoch
        contents["trainer"]["max_epochs"] = max(self.config["n_epochs"], epochs_in_checkpoint)
        present = {name: obj for name, obj in self.objects.items() if name in self.REQUIRED or name in contents}
        try:
            IgniteCheckpoint.load_objects(present, contents)
        except (RuntimeError, KeyError, ValueError, TypeError) as e:
            raise RunError(f"{path} does not fit this code's model or optimizer ({str(e).splitlines()[0][:150]}); "
                           "resume with the code that started the run, or use a new SAVE_PATH") from None
        # Tell ignite which files it saved before, so it keeps deleting all but the two newest.
        kept = [(checkpoint_iteration(p), p.name) for p in reversed(list_checkpoints(self.folder.checkpoints)[:2])]
        self.saver.load_state_dict({"_saved": kept})
        iteration = contents["trainer"]["iteration"]
        self.saved_at = (iteration, len(self.progress.log))
        # A kill between a checkpoint and its log.jsonl/status.json leaves those behind: rebuild them.
        if self.ranks.is_main:
            with disk_errors_stop_training(self.folder.path):
                self.folder.write_progress(self.progress.log, self.loop.status())
        self.loop.say(f"resuming from {path} (epoch {len(self.progress.log)}, iteration {iteration})")
        return True

    def choose(self):
        """(path, contents) of the newest whole checkpoint, or None. Rank 0 picks it (and sets damaged ones
        aside); the other ranks load the same file."""
        choice = found = None
        if self.ranks.is_main:
            try:
                found = load_newest(self.folder.checkpoints, self.REQUIRED, warn=self.loop.say, set_aside=True)
                choice = found and str(found[0])
            except CorruptCheckpoint as e:
                choice = RunError(str(e))
        choice = self.ranks.broadcast(choice)
        if isinstance(choice, RunError):
            raise choice
        if choice is None or self.ranks.is_main:
            return found
        return Path(choice), load_tensors(choice)
