"""Turn SIGTERM/SIGINT/SIGHUP/SIGUSR1/SIGUSR2 into 'checkpoint, then exit with 128 + N'.

The first signal only raises a flag that the main loop checks after each step, so the step in
flight finishes and a checkpoint is written. Outside the loop (start-up) there is nothing to save,
so we exit at once. A second Ctrl-C (SIGINT) exits at once too: every file is written atomically,
so nothing already saved can be damaged by it. A repeated SIGTERM, SIGUSR1 or SIGUSR2, or a Ctrl-C
after one of them, changes nothing: a cluster's signal (or a terminal's Ctrl-C) often reaches a run
twice, directly and through torchrun or a job wrapper, and must not cut its checkpoint short.
"""
import os
import signal

# SIGHUP: the terminal or ssh session went away; the run checkpoints like any other stop, and its
# printing goes on into stdout.log only (run_folder.Tee).
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2)


def _say(text):
    """Straight to file descriptor 2: a handler that used sys.stderr could re-enter a write in progress."""
    try:
        os.write(2, text.encode())
    except OSError:
        pass


class StopRequests:
    def __init__(self):
        self.signal_number = None
        self.in_loop = False
        self._previous = {}

    def __enter__(self):
        # A run started under `nohup` ignores SIGHUP: it asked to outlive its terminal, so keep it so.
        catch = [n for n in STOP_SIGNALS if not (n == signal.SIGHUP and signal.getsignal(n) == signal.SIG_IGN)]
        self._previous = {number: signal.signal(number, self._handle) for number in catch}
        return self

    def __exit__(self, *exc):
        for number, handler in self._previous.items():
            signal.signal(number, handler)

    def _handle(self, number, frame):
        name = signal.Signals(number).name
        # Only a second Ctrl-C cuts a stop short. A Ctrl-C after another signal is the same stop reaching the
        # run twice: a terminal's Ctrl-C goes to a sweep's job wrapper too, which passes it on as SIGTERM, and
        # that SIGTERM can arrive first (a sweep's runs exited without their checkpoint, 1 in 5 loaded CI runs).
        if self.signal_number is not None and not number == self.signal_number == signal.SIGINT:
            return  # already stopping
        if self.signal_number is not None or not self.in_loop:
            _say(f"\n{name}: exiting now\n")
            os._exit(128 + number)
        self.signal_number = number
        _say(f"\n{name}: finishing this step and writing a checkpoint, then exiting (send it again to exit at once)\n")

    @property
    def requested(self):
        return self.signal_number is not None

    @property
    def exit_code(self):
        return 128 + self.signal_number


def exit_at_once_on(*names):
    """Before a script's slow imports: these signals exit at once, quietly, with 128 + N.

    Outside the training loop (which takes them over to checkpoint first) there is nothing to save,
    and files are replaced atomically. A KeyboardInterrupt raised inside an import could surface as
    an ImportError with a traceback; and after the loop, a late duplicate of the signal that stopped
    the run (from torchrun, a job wrapper) would otherwise kill it as it exits.
    """
    for name in names:
        signal.signal(getattr(signal, name), _exit_now)


def _exit_now(number, frame):
    _say(f"{signal.Signals(number).name}: exiting now\n")
    os._exit(128 + number)
