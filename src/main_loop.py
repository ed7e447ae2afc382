"""The main loop: an ignite `Engine` plus named extensions, shared by every runner.

Before the loop, the run's precision and memory format are settled once (src.training.kernels: the config's,
a resumed run's own, or the fastest of a short timing trial on copies of the model).

What fires, in order (the order of attachment, which `MainLoop.attach_extensions` spells out):
    load on start        Checkpoint.resume: the newest whole checkpoint, if the run folder has one
    seeding, schedule    before each step: model randomness re-seeded from (seed, iteration); the
                         learning rate as a pure function of the iteration (src.training.optim)
    the step             forward, loss, backward, gradient clipping, optimizer step (src.training.recipe); sums
                         kept on the device; under fp16 through a gradient scaler (in the checkpoint)
    EMA                  after each step, when `ema` is on: the moving average of the weights
    Checkpoint           every `checkpoint_every_n_batches` batches, every `checkpoint_every_seconds`,
                         at each epoch end (after its log row) and at the end; the two newest kept
    validation, log      at each epoch end the log row, with validation (the EMA's too) every `valid_every`
                         epochs and at the last; then the best model by validation accuracy (the EMA's
                         weights and accuracy when it is on)
    figures              curves.png off the training thread, at most every `plot_every_seconds`, and at the end
    StopOnSignal         SIGTERM/SIGINT/SIGHUP/SIGUSR1/SIGUSR2: checkpoint after this step, exit 128 + N
    progress             a tqdm bar on a terminal, one line per epoch otherwise

Exact resume: the stream restarts at (epoch, batch) from the loop counters (its crop, flip, cutout
and mixup are drawn from (seed, epoch, batch)); everything else with state (weights, optimizer, EMA,
counters, this epoch's running sums, the log) is in the checkpoint.
"""
import contextlib
import datetime
import logging
import os
import sys
import time
from pathlib import Path

import torch
from ignite.engine import Engine, Events

from src.training import distributed
from src.runs.checkpoints import CorruptCheckpoint, load_newest, save_tensors
from src.data import derive_seed, get_dataset, load_dataset
from configs import family
from src.errors import RunError, UsageError
from src.evaluation import evaluation_batch, validation_columns
from src.extensions import EMA, Checkpoint, StopOnSignal, disk_errors_stop_training
from src.training.hardware import check_precision, choose_device, grad_scaler, kernel_settings
from src.training.kernels import (
    TORCH_FORMATS, TRIAL_BATCHES, CheckpointedKernels, choose_kernels, sessions_in_checkpoint, time_candidates,
)
from src.networks.size import model_size
from src.models import build_model as build_registered_model
from src.models import find_standardize
from src.extensions.monitoring import Monitors, format_row
from src.extensions.search_trial import SearchTrial, TrialLink
from src.training.optim import Clock, build_optimizer, learning_rate, parameter_groups, set_learning_rate
from src.training.recipe import Recipe, scored_labels, train_step  # train_step: bench.py times the same step
from src.runs.folder import BEST_MODEL, RunFolder, ends_run, is_finished
from src.signals import StopRequests

SEED_INIT, SEED_MODEL = 3, 4  # beside src.datasets.stream's SPLIT, ORDER, AUGMENT (0-2), CUTOUT (5), MIXUP (6)
CHECKPOINT_KEYS = Checkpoint.REQUIRED
LOG_EVERY = 50  # iterations between reads of the NaN flag and TensorBoard points (one host sync each)
# ignite logs an exception before re-raising it; ours are reported in one line by src.cli.
logging.getLogger("ignite").addHandler(logging.NullHandler())


class Progress:
    """What the loop accumulates: the per-epoch log, the running sums of the epoch in progress, the best score.

    The sums stay on the device (no host sync per step) and go into checkpoints, so an epoch
    resumed mid-way reports the same training loss as one never interrupted.
    """

    def __init__(self, device, rank=0, world_size=1):
        self.device, self.rank, self.world_size = device, rank, world_size
        self.all_sums = None
        self.log = []
        self.best_valid_acc = None
        self.finished_early = False  # set by an extension that ends the run for good (early stopping)
        self.first_bad = torch.zeros((), dtype=torch.int64, device=device)
        self.start_epoch(fresh=True)

    def start_epoch(self, fresh):
        if fresh:
            self.loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
            self.correct = torch.zeros((), dtype=torch.int64, device=self.device)
            self.count = 0
            self.seconds_before = 0.0
        self.started = time.perf_counter()

    def add(self, loss, logits, labels, iteration):
        loss = loss.detach()
        # The first iteration whose loss was NaN or inf, recorded on the device: no host sync per step.
        self.first_bad.copy_(torch.where((self.first_bad == 0) & ~torch.isfinite(loss), iteration, self.first_bad))
        self.loss_sum += loss.double() * len(labels)
        self.correct += (logits.detach().argmax(1) == labels).sum()
        self.count += len(labels)

    def train_seconds(self):
        return self.seconds_before + time.perf_counter() - self.started

    def sums(self):
        """This rank's (loss sum, correct, count) as one float64 tensor (exact for counts below 2**53)."""
        return torch.stack([self.loss_sum, self.correct.double(),
                            torch.tensor(float(self.count), dtype=torch.float64, device=self.device)])

    def state_dict(self):
        """Every rank's sums (`all_sums`, gathered by the main loop just before it saves), so that each
        rank resumes its own: summing them first would change the float rounding of the epoch's loss."""
        return {"log": self.log, "best_valid_acc": self.best_valid_acc, "rank_sums": self.all_sums,
                "seconds_before": self.train_seconds(), "finished_early": self.finished_early}

    def load_state_dict(self, state):
        self.log = list(state["log"])
        self.best_valid_acc = state["best_valid_acc"]
        self.finished_early = state.get("finished_early", False)  # absent from older checkpoints
        sums = state["rank_sums"]
        if len(sums) != self.world_size:  # another number of processes: rank 0 carries the epoch so far
            sums = [sum(sums)] + [torch.zeros_like(sums[0])] * (self.world_size - 1)
        loss_sum, correct, count = sums[self.rank].to(self.device)
        self.loss_sum, self.correct, self.count = loss_sum.clone(), correct.to(torch.int64), int(count)
        self.seconds_before = state["seconds_before"]


class EpochData:
    """What the Engine iterates: each `iter()` starts the stream where the loop counters say.

    ignite, resumed mid-epoch, re-iterates its data from the start and only shortens the epoch;
    this makes the data start at the right batch instead.
    """

    def __init__(self, stream, trainer):
        self.stream, self.trainer = stream, trainer

    def __len__(self):
        return len(self.stream)

    def __iter__(self):
        state = self.trainer.state
        return self.stream.epoch(state.epoch, start_batch=state.iteration % len(self.stream))


def run_main_loop(config, save_path, build_model=None):
    """Train `build_model(config)` (default: the family `config["model"]` names) as `config` says, in the
    run folder `save_path`; returns the exit code.

    Under torchrun, every rank runs this; rank 0 alone owns the run folder (lock, files, output).
    config.json and meta.json are written only once every start-up check has passed (device, data,
    model), so a failed start leaves the folder free to take the corrected command.
    """
    ranks = distributed.from_environment(config["device"])
    build_model = build_model or build_registered_model
    failed = True
    try:
        with contextlib.ExitStack() as cleanup:  # restores signals and streams, so a notebook can call this too
            stops = cleanup.enter_context(StopRequests())
            folder = RunFolder(save_path)
            done = ranks.on_main(lambda: open_run_folder(folder, config, cleanup))
            if done is not None:
                failed = False
                return say_finished(folder.path, done) if ranks.is_main else 0
            if ranks.is_main:
                cleanup.enter_context(folder.copy_output())
            if config["num_threads"]:
                torch.set_num_threads(config["num_threads"])
            device = choose_device(ranks.device_name(config["device"]))
            check_precision(config["precision"], device)  # one the device cannot run: refused before any work
            cleanup.enter_context(kernel_settings(device, config["deterministic"]))
            if ranks.world_size > 1:  # one download and one cache build, then the other ranks read the cache
                ranks.on_main(lambda: decode_data_once(config))
            stream, valid = training_data(config, device, ranks)
            model = build_training_model(config, build_model, stream, device)
            kernels = ranks.on_main(lambda: choose_run_kernels(config, folder, model, stream, device))
            optimizer = build_optimizer(config, parameter_groups(set_memory_format(model, kernels.memory_format),
                                                                 config))
            if ranks.is_main:
                with disk_errors_stop_training(folder.path):
                    folder.save_config(config)
                    folder.record_session(device, kernels.record(), ranks.world_size,
                                          model_size(model, valid[0].shape[1:]))
                if kernels.trial:
                    print(kernels.describe(), flush=True)
            # No name holds the loop (nor its DDP wrapper): ranks.close() collects it before tearing the group down.
            code = MainLoop(config, folder, model, optimizer, stream, valid, device, kernels, stops, ranks).run()
            failed = False
            return code
    except distributed.RankZeroFailed as e:  # rank 0 printed the reason; leave with its code, silently
        return e.code
    finally:
        ranks.close(failed)


def training_data(config, device, ranks):
    """(the training stream with the config's augmentation, the validation arrays), this rank's share."""
    stream, valid = get_dataset(config["dataset"], config["augment"], config["batch_size"], config["seed"], device,
                                config["valid_size"], config["n_examples"], config["label_mode"],
                                shard=(ranks.rank, ranks.world_size))
    stream.augmentation(config["crop_padding"], config["crop_padding_mode"], config["flip"])
    stream.jitter(config["brightness"], config["contrast"])
    stream.regularise(config["cutout"], config["mixup"])
    if stream.batch_size % ranks.world_size:
        raise UsageError(f"the global batch of {stream.batch_size} images must divide evenly among "
                         f"{ranks.world_size} processes: change --batch_size")
    budget, epochs = config["n_iterations"], config["n_epochs"]
    if budget and not (epochs - 1) * len(stream) < budget <= epochs * len(stream):
        raise UsageError(f"--n_iterations={budget} must end in the run's last epoch: with {len(stream)} batches an "
                         f"epoch, give --n_epochs={-(-budget // len(stream))}")
    return stream, valid


def decode_data_once(config):
    load_dataset(config["dataset"], label_mode=config["label_mode"])  # builds the cache; nothing to broadcast


def open_run_folder(folder, config, cleanup):
    """Rank 0: take the folder and check it may run `config`; the epochs done if it is already finished."""
    cleanup.enter_context(folder)
    folder.check_config(config, family(config))
    status = folder.read_status()
    if status and is_finished(status, config["n_epochs"]):  # said by status.json; the checkpoint decides
        done = finished_in_checkpoint(folder, config["n_epochs"])
        if done is not None:
            return done
    folder.refuse_lost_checkpoints()
    return None


def finished_in_checkpoint(folder, n_epochs):
    """The epochs done if the newest whole checkpoint says the run is finished at `n_epochs`, else None (an
    edited or stale status.json is not believed: the resume rebuilds it, and a damaged checkpoint is said there)."""
    try:
        found = load_newest(folder.checkpoints, CHECKPOINT_KEYS, warn=lambda line: None)
    except CorruptCheckpoint:
        return None
    progress = found[1]["progress"] if found else None
    if not isinstance(progress, dict) or not isinstance(progress.get("log"), list):
        return None
    done, early = len(progress["log"]), progress.get("finished_early") is True
    return done if is_finished({"finished": True, "epochs_done": done, "finished_early": early}, n_epochs) else None


def build_training_model(config, build_model, stream, device):
    """The model with its input statistics, on the device, in the contiguous (NCHW) format: the run's kernels
    (`choose_run_kernels`) set the format it trains in, then the optimizer is built on it."""
    torch.manual_seed(derive_seed(config["seed"], SEED_INIT))  # the initial weights
    try:
        model = build_model(config)
        find_standardize(model).set_statistics(stream.mean, stream.std)
        if hasattr(model, "init_from_data"):  # e.g. src/fast.py's whitening: training images only, deterministic
            model.init_from_data(stream.images)
        model.to(device)
    except (torch.OutOfMemoryError, MemoryError) as e:
        raise RunError(f"the model does not fit in memory ({str(e).splitlines()[0][:150]}); make it smaller") from None
    return model


def training_model(config, build_model, stream, device, memory_format):
    """The model as the main loop trains it in `memory_format`, and its optimizer (for the bench and tests)."""
    model = set_memory_format(build_training_model(config, build_model, stream, device), memory_format)
    return model, build_optimizer(config, parameter_groups(model, config))


def set_memory_format(model, memory_format):
    """`model` (and the images its Standardize brick hands on) in `memory_format`: channels_last | contiguous."""
    find_standardize(model).channels_last = memory_format == "channels_last"
    return model.to(memory_format=TORCH_FORMATS[memory_format])


def choose_run_kernels(config, folder, model, stream, device):
    """Rank 0: the precision and memory format of this run (src.training.kernels): the config's, a resumed
    run's own, or the fastest of a timing trial on copies of `model`, which is left as it was."""
    sessions = None
    if folder.has_checkpoints():  # resuming: its own choice, from meta.json or, where that lost it, the checkpoint
        sessions = folder.read_sessions()
        if not any("precision" in session for session in sessions):
            with contextlib.suppress(CorruptCheckpoint):  # said, and set aside, when the loop loads it
                found = load_newest(folder.checkpoints, warn=lambda line: None)
                sessions = sessions_in_checkpoint(found[1]) if found else []

    def trial(pairs):
        batches = [batch for _, batch in zip(range(TRIAL_BATCHES), stream.epoch(1), strict=False)]
        return time_candidates(pairs, model, set_memory_format, config, batches, device, len(stream))

    return choose_kernels(config, device, sessions, config["n_epochs"] * len(stream), trial)


def data_parallel(model, device, ranks):
    """DistributedDataParallel under torchrun (batch norm synchronised across GPUs; on CPUs, where
    SyncBatchNorm does not run, each rank normalises its own slice); the model itself otherwise."""
    if ranks.world_size == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel

    if device.type == "cuda":
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        return DistributedDataParallel(model, device_ids=[device.index])
    return DistributedDataParallel(model)


def say_finished(save_path, epochs_done):
    print(f"{save_path} is already finished ({epochs_done} epochs); nothing to do. "
          "Raise --n_epochs to train further.")
    return 0


class MainLoop:
    def __init__(self, config, folder, model, optimizer, stream, valid, device, kernels, stops, ranks):
        self.config, self.folder, self.model, self.optimizer = config, folder, model, optimizer
        self.stream, self.valid, self.device, self.stops = stream, valid, device, stops
        self.precision = kernels.precision
        self.ranks = ranks
        # The wrappers share their parameters with `model`, which checkpoints and evaluation use.
        self.forward = data_parallel(model, device, ranks)
        if config["compile"]:
            self.forward = torch.compile(self.forward, mode=config["compile_mode"])
        self.trainer = Engine(self.step)
        self.progress = Progress(device, ranks.rank, ranks.world_size)
        self.checkpoint = Checkpoint(self)
        self.kernels = CheckpointedKernels(kernels, device)
        self.checkpoint.register("kernels", self.kernels)
        self.scaler = grad_scaler(device, self.precision)  # fp16 only; its skipped steps resume exactly
        if self.scaler is not None:
            self.checkpoint.register("scaler", self.scaler)
        self.recipe = Recipe.from_config(config)
        self.ema = EMA(model, config["ema"], self.checkpoint) if config["ema"] else None
        link = TrialLink.from_environment()
        self.search = SearchTrial(link, self) if link else None
        self.bar = None
        self.attach_extensions()

    @property
    def total_iterations(self):
        """The run's steps: n_epochs whole epochs, or `n_iterations` (a budget ending mid-way through the last)."""
        return self.config["n_iterations"] or self.config["n_epochs"] * len(self.stream)

    def step(self, engine, batch):
        loss, logits = train_step(self.forward, self.optimizer, batch, self.device, self.precision, self.recipe,
                                  self.scaler)
        self.progress.add(loss, logits, scored_labels(batch), engine.state.iteration)

    def attach_extensions(self):
        """ignite calls the handlers of one event in the order they were added: this order is the contract."""
        t = self.trainer
        t.add_event_handler(Events.EPOCH_STARTED, self.start_epoch)
        t.add_event_handler(Events.ITERATION_STARTED, self.before_step)
        t.add_event_handler(Events.EPOCH_COMPLETED, self.end_epoch)  # the log row, before the checkpoint holds it
        if self.ema:
            self.ema.attach(t)  # updated after each step before anything saves it
        self.checkpoint.attach(t)  # mid-epoch saves, then the epoch-end save
        t.add_event_handler(Events.ITERATION_COMPLETED(every=LOG_EVERY), self.log_now_and_then)
        t.add_event_handler(Events.EPOCH_COMPLETED, self.draw)  # after the save: figures never delay the checkpoint
        if self.search:  # a search's trial: the saved epoch's metric to its study, and the pruner's answer
            self.search.attach(t)
        StopOnSignal(self.stops, self.checkpoint, self.ranks).attach(t)  # last: a stop saves what all above did
        if self.total_iterations < self.config["n_epochs"] * len(self.stream):  # a budget ending mid-epoch
            t.add_event_handler(Events.ITERATION_COMPLETED(once=self.total_iterations), lambda e: e.terminate_epoch())
            t.add_event_handler(Events.EPOCH_COMPLETED, self.end_at_budget)  # after its row and checkpoint
        if sys.stdout.isatty() and self.ranks.is_main:
            from ignite.handlers import ProgressBar

            self.bar = ProgressBar(persist=False)
            self.bar.attach(t)

    def run(self):
        self.checkpoint.resume(len(self.stream))
        changed = self.kernels.changed()
        if changed:
            self.say(f"warning: the checkpoint was computed in other kernels ({changed}); the run "
                     "goes on, but will not match an uninterrupted run bit for bit")
        if self.finished():
            return say_finished(self.folder.path, len(self.progress.log))
        if self.ema:
            self.say("ema: best_model.pt holds the moving average of the weights with the best ema_valid_acc")
        self.monitors = Monitors(self.folder, self.config["tensorboard"], self.trainer.state.iteration,
                                 enabled=self.ranks.is_main, plot_every_seconds=self.config["plot_every_seconds"])
        self.checkpoint.before_save.append(self.monitors.settle)  # a failed drawing stops the run before a save
        self.trainer.add_event_handler(Events.ITERATION_COMPLETED(once=self.trainer.state.iteration + 1),
                                       self.report_start_up)
        self.stops.in_loop = True
        try:
            self.trainer.run(EpochData(self.stream, self.trainer), max_epochs=self.config["n_epochs"])
            with disk_errors_stop_training(self.folder.path):  # finished or stopped by a signal: the whole log
                self.monitors.finish(self.progress.log)
        finally:
            self.stops.in_loop = False
            self.monitors.close()
        if self.search and self.search.pruned_at is not None:
            return self.end_pruned()
        if self.stops.requested and not self.finished():
            if self.ranks.is_main:
                print(f"stopped at iteration {self.trainer.state.iteration} with a checkpoint; "
                      "rerun the same command to resume", file=sys.stderr)
            return self.stops.exit_code
        self.say(f"finished {self.config['n_epochs']} epochs in {self.folder.path}")
        return 0

    def end_at_budget(self, engine):
        """The last, shortened epoch is logged and saved: the run ends here (ignite would start another)."""
        if engine.state.iteration >= self.total_iterations:
            engine.terminate()

    def end_pruned(self):
        """Stopped by the search's pruner: status.json says so; the checkpoint stays for whoever trains it on."""
        if self.ranks.is_main:
            with disk_errors_stop_training(self.folder.path):
                self.folder.write_progress(self.progress.log, self.status())
        self.say(f"pruned by the search at epoch {self.search.pruned_at} (trial {self.search.link.trial}); the "
                 f"checkpoint is kept: the runner on {self.folder.path} trains it on to its {self.config['n_epochs']} "
                 "epochs, exactly")
        return 0

    def start_epoch(self, engine):
        self.progress.start_epoch(fresh=engine.state.iteration % len(self.stream) == 0)

    def before_step(self, engine):
        iteration = engine.state.iteration
        ranks = () if self.ranks.world_size == 1 else (self.ranks.rank,)  # each rank its own dropout masks
        torch.manual_seed(derive_seed(self.config["seed"], SEED_MODEL, iteration, *ranks))
        lr = learning_rate(self.config, iteration, self.total_iterations, len(self.stream))
        set_learning_rate(self.optimizer, lr, Clock(iteration, self.total_iterations, len(self.stream)))

    def report_start_up(self, engine):
        seconds = seconds_since_process_start()
        if seconds is not None:
            self.say(f"first step done {seconds:.1f} s after the command started")

    def log_now_and_then(self, engine):
        self.checkpoint.check_loss_finite()
        with disk_errors_stop_training(self.folder.path):  # TensorBoard, like the checkpoints
            self.monitors.iteration(engine.state.iteration, self.progress, self.optimizer.param_groups[0]["lr"])

    def finished(self):
        return is_finished(self.status(), self.config["n_epochs"])

    def status(self):
        iteration = self.trainer.state.iteration
        epochs_done, early = len(self.progress.log), self.progress.finished_early
        return {
            "epochs_done": epochs_done,
            "finished_early": early,
            "iterations_done": iteration,
            "n_epochs": self.config["n_epochs"],
            "batches_per_epoch": len(self.stream),
            "finished": ends_run(epochs_done, early, self.config["n_epochs"]),
            "best_valid_acc": self.progress.best_valid_acc,
            "last_checkpoint": f"checkpoint_{iteration}.pt",
            "updated": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            **({"pruned_at_epoch": self.search.pruned_at} if self.search and self.search.pruned_at else {}),
        }

    def end_epoch(self, engine):
        """Validation, the log row and the best model; the Checkpoint extension saves right after."""
        p = self.progress
        self.checkpoint.check_loss_finite()
        self.checkpoint.check_weights_finite(engine.state.iteration)  # before they can become the best model
        loss_sum, correct, count = self.ranks.sum(p.sums()).tolist()  # the one host sync of the epoch
        train_seconds = p.train_seconds()
        valid_started = time.perf_counter()
        validate = [(self.model, "")] + ([(self.ema.model, "ema_")] if self.ema else [])
        valid = self.valid if self.validates(len(p.log) + 1) else (self.valid[0][:0], self.valid[1][:0])  # None
        columns = {}
        for model, prefix in validate:
            columns.update(validation_columns(model, *valid, self.device, self.precision,
                                              evaluation_batch(self.device, self.config["batch_size"]), prefix))
        row = {"epoch": len(p.log) + 1, "iteration": engine.state.iteration, "train_loss": loss_sum / count,
               "train_acc": correct / count, **columns, "lr": self.optimizer.param_groups[0]["lr"],
               "epoch_seconds": train_seconds + time.perf_counter() - valid_started,
               "images_per_second": count / train_seconds, "finished_at": time.time()}
        p.log.append(row)
        best, prefix = validate[-1]  # with an EMA, the best model is the EMA's, by its own accuracy
        valid_acc = row[prefix + "valid_acc"]
        if valid_acc is not None and (p.best_valid_acc is None or valid_acc > p.best_valid_acc):
            p.best_valid_acc = valid_acc
            if self.ranks.is_main:
                with disk_errors_stop_training(self.folder.path):
                    save_tensors(best.state_dict(), self.folder.path / BEST_MODEL)
        self.say(format_row(row, self.config["n_epochs"]))

    def validates(self, epoch):
        """Every `valid_every` epochs and the last: a pure function of the epoch, so a resumed run validates
        the same epochs. The others log None, and cannot become the best model."""
        return epoch % self.config["valid_every"] == 0 or epoch >= self.config["n_epochs"]

    def draw(self, engine):
        with disk_errors_stop_training(self.folder.path):  # curves.png and TensorBoard, like the checkpoints
            self.monitors.epoch(self.progress.log)

    def say(self, line):
        if not self.ranks.is_main:
            return
        if self.bar is not None:
            self.bar.log_message(line)
        else:
            print(line, flush=True)


def seconds_since_process_start():
    """Wall time since this process was created (Linux), for the start-up cost; None elsewhere."""
    try:
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        started = int(fields[19]) / os.sysconf("SC_CLK_TCK")
        return float(Path("/proc/uptime").read_text().split()[0]) - started
    except (OSError, ValueError, IndexError):
        return None
