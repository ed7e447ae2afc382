"""Train the simple CNN: python src/scripts/train_simple_CNN.py CONFIG SAVE_PATH [--key=value ...]

Rerunning the same command resumes the run; rerunning a finished run does nothing.
"""
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from anywhere, no PYTHONPATH

from src.signals import exit_at_once_on  # noqa: E402  (os and signal only: in place before the slow imports)

if __name__ == "__main__":
    exit_at_once_on("SIGINT", "SIGTERM", "SIGUSR1", "SIGUSR2")

# No TorchScript is used here; without it, importing ignite (which scripts torch's functional
# optimizers at import) is 0.3 s faster. An explicit PYTORCH_JIT=1 still wins.
os.environ.setdefault("PYTORCH_JIT", "0")

from configs.simple_cnn import simple_cnn_configs  # noqa: E402
from src.cli import dispatch_with_overrides  # noqa: E402


def train(config, save_path):
    """`config` has been checked by the registry (src.cli); the family's model is built by name."""
    from src.main_loop import run_main_loop

    return run_main_loop(config, save_path)


if __name__ == "__main__":
    dispatch_with_overrides(train, simple_cnn_configs, description=__doc__)
