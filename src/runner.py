"""What every family's runner does (`src/scripts/train_<family>.py CONFIG SAVE_PATH [--key=value ...]`):
parse the command line against the family's registry, check the config, train in the main loop.

Imports only the standard library at first, so that a runner can hand its signals over before
torch is imported (a Ctrl-C during imports then exits quietly).
"""
import os

from src.signals import exit_at_once_on


def main(family_name, description):
    """`family_name`: the model family whose registry (configs/<family>.py) the command line is parsed
    against; the configs are imported only after the signals are set."""
    # Outside the training loop, which takes these over to checkpoint first, there is nothing to save.
    exit_at_once_on("SIGINT", "SIGTERM", "SIGUSR1", "SIGUSR2")
    # No TorchScript is used here; without it, importing ignite (which scripts torch's functional
    # optimizers at import) is 0.3 s faster. An explicit PYTORCH_JIT=1 still wins.
    os.environ.setdefault("PYTORCH_JIT", "0")
    from configs import family
    from src.cli import dispatch_with_overrides

    dispatch_with_overrides(train, family(family_name), description=description)


def train(config, save_path):
    """`config` has been checked by the registry (src.cli); the family's model is built by name."""
    from src.main_loop import run_main_loop

    return run_main_loop(config, save_path)
