"""What a researcher watches while a run trains: curves.png, and TensorBoard scalars.

TensorBoard events go to SAVE_PATH/tensorboard/, keyed by iteration, so `tensorboard --logdir
results` shows every run. On resume, events after the checkpoint's iteration are purged, so the
curves of a resumed run have no doubled segments.

curves.png is drawn off the training thread (0.3 s a drawing on this project's CPU, 0.7 s the first:
on a fast GPU as long as an epoch), at the first epoch end of each session, then at most every
`plot_every_seconds`, and always at the end of a session (finished or stopped by a signal). A drawing
that fails (a full disk) stops the run like a checkpoint that cannot be written: the failure is raised
on the training thread before the next checkpoint is written, or at the end.
"""
import contextlib
import sys
import threading
import time

from src.runs.names import CURVES, TENSORBOARD

EPOCH_SCALARS = ("train_loss", "train_acc", "valid_loss", "valid_acc", "ema_valid_loss", "ema_valid_acc", "lr",
                 "images_per_second", "epoch_seconds")


class Monitors:
    def __init__(self, folder, tensorboard, start_iteration, enabled=True, plot_every_seconds=0.0):
        """`enabled` False (ranks other than 0): write nothing at all."""
        self.folder, self.enabled = folder, enabled
        self.tensorboard = tensorboard and enabled
        self.start_iteration = start_iteration
        self._writer = None
        self._last = (start_iteration, time.perf_counter())
        self.curves = Curves(folder.path / CURVES, f"{folder.path.name}: learning curves", plot_every_seconds)

    @property
    def writer(self):
        """Created on first use: importing TensorBoard would otherwise delay the first step."""
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            # Points after the checkpoint's iteration belong to a timeline that was thrown away: every
            # session marks them as purged (the point at the checkpoint's own iteration stays).
            quiet_tensorboard_threads()
            self._writer = SummaryWriter(log_dir=str(self.folder.path / TENSORBOARD),
                                         purge_step=self.start_iteration + 1)
        return self._writer

    @contextlib.contextmanager
    def _naming_tensorboard(self):
        """The writer's errors name no file: name the folder, so the one-line report says where."""
        try:
            yield
        except OSError as e:
            if e.filename is None and e.errno is not None:
                raise OSError(e.errno, e.strerror, str(self.folder.path / TENSORBOARD)) from e
            raise

    def iteration(self, iteration, progress, lr):
        """Running means of the epoch so far (one host sync), the learning rate and the recent speed."""
        if not self.tensorboard or not progress.count:
            return
        last_iteration, last_time = self._last
        now = time.perf_counter()
        scalars = {"train_loss": progress.loss_sum.item() / progress.count,
                   "train_acc": progress.correct.item() / progress.count, "lr": lr}
        if iteration > last_iteration:
            scalars["iterations_per_second"] = (iteration - last_iteration) / (now - last_time)
        with self._naming_tensorboard():
            for name, value in scalars.items():
                self.writer.add_scalar(f"iteration/{name}", value, iteration)
        self._last = (iteration, now)

    def epoch(self, log):
        """Epoch scalars to TensorBoard (flushed: a few ms), and curves.png redrawn if it is due."""
        if not self.enabled:
            return
        row = log[-1]
        if self.tensorboard:
            with self._naming_tensorboard():
                for name in EPOCH_SCALARS:
                    if row.get(name) is not None:
                        self.writer.add_scalar(f"epoch/{name}", row[name], row["iteration"])
                self.writer.flush()
        self.curves.request(log)
        self._last = (row["iteration"], time.perf_counter())

    def settle(self):
        """Wait for a drawing in progress; raise its error (OSError) here, on the training thread."""
        if self.enabled:
            self.curves.settle()

    def finish(self, log):
        """The end of a session: curves.png drawn from the whole log, on this thread, if it is not already."""
        if self.enabled:
            self.curves.finish(log)

    def close(self):
        self.curves.abandon()
        if self._writer is not None:
            try:
                self._writer.close()
            except OSError as e:  # never hide the error or the signal that ended the run
                print(f"warning: could not finish the TensorBoard events ({e.strerror or e})", file=sys.stderr)


def quiet_tensorboard_threads():
    """TensorBoard writes from a thread of its own, which dies on a full disk (ENOSPC); the same error is
    raised again by the writer's next call here and reported in one line, so the thread's traceback
    is only noise. Installed once per process; every other thread error goes to the hook that was there."""
    previous = threading.excepthook
    if getattr(previous, "quiet_tensorboard", False):
        return

    def hook(args):
        if not (isinstance(args.exc_value, OSError) and type(args.thread).__module__.startswith("tensorboard.")):
            previous(args)

    hook.quiet_tensorboard = True
    threading.excepthook = hook


def format_row(row, n_epochs):
    """The line printed after each epoch; "-" for a column without a value (an epoch not validated)."""
    def fmt(value, spec):
        return "-" if value is None else format(value, spec)

    ema = (f"ema valid loss {fmt(row['ema_valid_loss'], '.4f')} acc {fmt(row['ema_valid_acc'], '.4f')}  "
           if "ema_valid_acc" in row else "")
    return (f"epoch {row['epoch']}/{n_epochs}  iter {row['iteration']}  "
            f"train loss {row['train_loss']:.4f} acc {row['train_acc']:.4f}  "
            f"valid loss {fmt(row['valid_loss'], '.4f')} acc {fmt(row['valid_acc'], '.4f')}  {ema}"
            f"lr {row['lr']:.4g}  {row['epoch_seconds']:.1f} s  {row['images_per_second']:.0f} img/s")


class Curves:
    """curves.png, redrawn on a thread of its own from a copy of the log, at most every `every_seconds`."""

    def __init__(self, path, title, every_seconds):
        self.path, self.title, self.every_seconds = path, title, every_seconds
        self.last_started = None  # time.monotonic() of the last drawing started in this session
        self.drawn_rows = None  # log rows in the last drawing finished
        self.thread = None
        self.error = None

    def request(self, log):
        """At an epoch end: start a drawing if one is due and none is in progress (else the next epoch asks)."""
        self.raise_error()
        now = time.monotonic()
        due = self.last_started is None or now - self.last_started >= self.every_seconds
        if not due or (self.thread is not None and self.thread.is_alive()):
            return
        self.last_started = now
        rows = list(log)  # rows are never changed once logged: a shallow copy is a snapshot
        self.thread = threading.Thread(target=self._draw_catching, args=(rows,), name="curves.png", daemon=True)
        self.thread.start()

    def settle(self):
        if self.thread is not None:
            self.thread.join()
        self.raise_error()

    def finish(self, log):
        self.settle()
        if log and self.drawn_rows != len(log):
            self._draw(list(log))

    def abandon(self):
        """Leaving on an error: let a drawing in progress end (its file is replaced whole or not at all)."""
        if self.thread is not None:
            self.thread.join()

    def raise_error(self):
        error, self.error = self.error, None
        if error is not None:
            raise error

    def _draw_catching(self, rows):
        try:
            self._draw(rows)
        except Exception as e:  # noqa: BLE001  (raised again on the training thread, which reports it in one line)
            self.error = e

    def _draw(self, rows):
        import pandas as pd

        from src.runs.plots import plot_curves

        plot_curves(pd.DataFrame(rows), self.path, title=self.title)
        self.drawn_rows = len(rows)
