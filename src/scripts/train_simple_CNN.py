"""Train the simple CNN: python src/scripts/train_simple_CNN.py CONFIG SAVE_PATH [--key=value ...]

Rerunning the same command resumes the run; rerunning a finished run does nothing.
"""
import os
import signal
import sys


def _exit_at_once(number, frame):
    os.write(2, f"{signal.Signals(number).name}: exiting now\n".encode())
    os._exit(128 + number)


# Outside the training loop, which takes these signals over to checkpoint first, there is nothing to
# save: Ctrl-C, SIGTERM, SIGUSR1/2 exit at once, quietly, with 128 + N. Before the loop, a KeyboardInterrupt
# raised inside an import could surface as an ImportError and its traceback; after it, a late duplicate
# of the signal that stopped the run (from torchrun, a job wrapper) would otherwise kill it as it exits.
if __name__ == "__main__":
    for _number in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(_number, _exit_at_once)

# No TorchScript is used here; without it, importing ignite (which scripts torch's functional
# optimizers at import) is 0.3 s faster. An explicit PYTORCH_JIT=1 still wins.
os.environ.setdefault("PYTORCH_JIT", "0")

from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from anywhere, no PYTHONPATH

from configs.simple_cnn import simple_cnn_configs, validate  # noqa: E402
from src.cli import dispatch_with_overrides  # noqa: E402
from src.errors import UsageError  # noqa: E402


def train(config, save_path):
    problems = validate(config)
    if problems:
        raise UsageError("; ".join(problems))
    from src.main_loop import run_main_loop
    from src.models import build_simple_cnn

    return run_main_loop(config, save_path, build_simple_cnn)


if __name__ == "__main__":
    dispatch_with_overrides(train, simple_cnn_configs, description=__doc__)
