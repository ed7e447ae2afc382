"""Extensions of the main loop, in Blocks' vocabulary on ignite's events: each a small class whose
`attach(engine)` adds its handlers with their triggers (`every=`, `once=`, `EPOCH_COMPLETED`).

    Checkpoint     load on start; save every N batches, every N seconds, at each epoch end and at the
                   end; the finite-value guards before every save; every rank's running sums gathered
    StopOnSignal   SIGTERM/SIGINT/SIGHUP/SIGUSR1/SIGUSR2: checkpoint after this step, stop
    EMA            an exponential moving average of the weights, updated after every step, in the checkpoint

Under torchrun a decision to checkpoint or stop is taken by all ranks together (`agreed`).
"""
import contextlib
import copy
import time
from pathlib import Path

import torch
from ignite.engine import Events
from ignite.handlers import Checkpoint as IgniteCheckpoint

from src.checkpoint import (
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


class StopOnSignal:
    """A stop signal (src.signals.StopRequests) ends the run after the step in flight, with a checkpoint.

    Attach after Checkpoint and after the epoch's log row: at an epoch's last step the stop waits for
    EPOCH_COMPLETED, so the checkpoint it writes holds that epoch's row.
    """

    def __init__(self, stops, checkpoint, ranks):
        self.stops, self.checkpoint, self.ranks = stops, checkpoint, ranks

    def attach(self, engine):
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.stop_if_asked, mid_epoch=True)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.stop_if_asked, mid_epoch=False)

    def stop_if_asked(self, engine, mid_epoch):
        if mid_epoch and at_epoch_end(engine):
            return  # the epoch's end comes first, then this is asked again
        if agreed(self.ranks, engine, self.stops.requested, mid_epoch):
            self.checkpoint.save(engine)
            engine.terminate(skip_completed=True)


class EMA:
    """An exponential moving average of the weights (`ema` = its decay), updated after every optimizer step:
    W_ema <- decay * W_ema + (1 - decay) * W, starting from the weights after the first step.

    Batch-norm statistics are averaged like the weights (as `AveragedModel(use_buffers=True)` does), so the
    average is a model that runs as it is, without a pass over the data to recompute them. The main loop
    validates it each epoch (`ema_valid_loss`, `ema_valid_acc`) and, while it is on, chooses and saves
    `best_model.pt` from it. Its state goes into the checkpoint as "ema": {"model": a state dict the
    model's own `load_state_dict` takes, "n_averaged": the number of updates}.
    """

    def __init__(self, model, decay, checkpoint=None):
        from torch.optim.swa_utils import get_ema_multi_avg_fn

        self.source, self.checkpoint = model, checkpoint
        self.model = copy.deepcopy(model).requires_grad_(False)
        self.average = get_ema_multi_avg_fn(decay)  # torch's own arithmetic (a foreach lerp)
        self.n_averaged = 0

    def attach(self, engine):
        """Attach before Checkpoint: every checkpoint then holds the average of the step it saves."""
        self.checkpoint.register("ema", self)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.update)

    @torch.no_grad()
    def update(self, engine=None):
        """What `AveragedModel.update_parameters` does, with the count kept on the host: its count is a tensor,
        and reading it (or copying it to the GPU) would make every step wait for the device."""
        pairs = zip([*self.model.parameters(), *self.model.buffers()],
                    [*self.source.parameters(), *self.source.buffers()], strict=True)
        if self.n_averaged == 0:
            for averaged, current in pairs:
                averaged.copy_(current)
        else:
            by_dtype = {}  # the average takes tensors of one dtype at a time (batch norm counts are int64)
            for averaged, current in pairs:
                lists = by_dtype.setdefault(averaged.dtype, ([], []))
                lists[0].append(averaged)
                lists[1].append(current)
            for averaged, current in by_dtype.values():
                self.average(averaged, current, None)
        self.n_averaged += 1

    def state_dict(self):
        return {"model": self.model.state_dict(), "n_averaged": torch.tensor(self.n_averaged)}

    def load_state_dict(self, state):
        self.model.load_state_dict(state["model"])
        self.n_averaged = int(state["n_averaged"])
