"""The run folder SAVE_PATH/: every file name it holds, defined once here (the rest of the code imports them).

    config.json       the resolved config
    meta.json         how, where and with what each session of the run was started
    log.jsonl         one JSON row per finished epoch
    status.json       epochs_done, iterations_done, finished, ...
    checkpoints/      checkpoint_<iteration>.pt, the two newest
    best_model.pt     weights with the best validation accuracy so far
    curves.png        learning curves, redrawn at most every plot_every_seconds and at the end
    tensorboard/      TensorBoard event files
    stdout.log, stderr.log   copies of what the runs printed
    eval_<set>.json, confusion_<set>_*, reliability_<set>_*.png, predictions_<set>_*.npz   written by evaluate.py
"""
from src.files import LOCK_FILE, TMP_PREFIX

CONFIG, META, LOG, STATUS = "config.json", "meta.json", "log.jsonl", "status.json"
CHECKPOINTS, BEST_MODEL = "checkpoints", "best_model.pt"
CURVES, TENSORBOARD = "curves.png", "tensorboard"
STDOUT, STDERR = "stdout.log", "stderr.log"
EVAL_FILES = "eval_*.json"  # evaluate.py's numbers: eval_<set>.json (eval_test.json for the run's own test set)


def eval_file(test_set):
    return f"eval_{test_set}.json"


def model_file(kind, test_set, model, suffix):
    """evaluate.py's per-model files: confusion_<set>_<model>.csv/png, reliability_<set>_<model>.png,
    predictions_<set>_<model>.npz (`kind` is confusion, reliability or predictions)."""
    return f"{kind}_{test_set}_{model}{suffix}"


# What a run leaves once it has trained: with any of these there, the folder holds work to protect.
PROGRESS_FILES = (LOG, STATUS, BEST_MODEL)
# Everything a run or evaluate.py writes here; a folder holding anything else is not a run folder.
RUN_FILE_NAMES = {CONFIG, META, LOG, STATUS, CHECKPOINTS, BEST_MODEL, CURVES, TENSORBOARD, STDOUT, STDERR, LOCK_FILE,
                  eval_file("test")}
RUN_FILE_PREFIXES = (TMP_PREFIX, "confusion_", "eval_", "reliability_", "predictions_")
