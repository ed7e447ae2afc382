"""Train the pre-activation ResNet-18: python src/scripts/train_preact_resnet.py CONFIG SAVE_PATH [--key=value ...]

Rerunning the same command resumes the run; rerunning a finished run does nothing.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from anywhere, no PYTHONPATH

from src.runner import main, train  # noqa: E402, F401  (standard library only, so far; train: for tests)

if __name__ == "__main__":
    main("preact_resnet", __doc__)
