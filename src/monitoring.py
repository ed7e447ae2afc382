"""What a researcher watches while a run trains: curves.png after every epoch, and TensorBoard scalars.

TensorBoard events go to SAVE_PATH/tensorboard/, keyed by iteration, so `tensorboard --logdir
results` shows every run. On resume, events after the checkpoint's iteration are purged, so the
curves of a resumed run have no doubled segments.
"""
import contextlib
import sys
import threading
import time

CURVES = "curves.png"
TENSORBOARD = "tensorboard"
EPOCH_SCALARS = ("train_loss", "train_acc", "valid_loss", "valid_acc", "ema_valid_loss", "ema_valid_acc", "lr",
                 "images_per_second", "epoch_seconds")


class Monitors:
    def __init__(self, folder, tensorboard, start_iteration, enabled=True):
        """`enabled` False (ranks other than 0): write nothing at all."""
        self.folder, self.enabled = folder, enabled
        self.tensorboard = tensorboard and enabled
        self.start_iteration = start_iteration
        self._writer = None
        self._last = (start_iteration, time.perf_counter())

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
        """Epoch scalars to TensorBoard, and curves.png redrawn from the whole log."""
        if not self.enabled:
            return
        import pandas as pd

        from src.plots import plot_curves

        row = log[-1]
        if self.tensorboard:
            with self._naming_tensorboard():
                for name in EPOCH_SCALARS:
                    if row.get(name) is not None:
                        self.writer.add_scalar(f"epoch/{name}", row[name], row["iteration"])
                self.writer.flush()
        plot_curves(pd.DataFrame(log), self.folder.path / CURVES, title=f"{self.folder.path.name}: learning curves")
        self._last = (row["iteration"], time.perf_counter())

    def close(self):
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
