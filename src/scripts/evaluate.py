"""Test accuracy and loss of a run: python src/scripts/evaluate.py SAVE_PATH

The only code in this project that reads the test set. Writes SAVE_PATH/eval_test.json.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from anywhere, no PYTHONPATH

from src.signals import exit_at_once_on  # noqa: E402  (os and signal only: in place before the slow imports)

if __name__ == "__main__":
    exit_at_once_on("SIGINT")


from src.cli import dispatch, exit_codes  # noqa: E402
from src.errors import RunError, UsageError  # noqa: E402

RESULT_FILE = "eval_test.json"


@exit_codes
def main(save_path, *, data_dir=None, device="auto", allow_unfinished=False):
    """Evaluate the latest and the best model of the run in SAVE_PATH on the test set."""
    import numpy as np
    import torch

    from src.analysis import load_main_loop
    from src.checkpoint import CorruptCheckpoint
    from src.data import class_names, load_dataset
    from src.evaluation import evaluate
    from src.files import write_json
    from src.hardware import choose_device
    from src.run_folder import is_finished

    if device not in ("auto", "cpu", "cuda"):
        raise UsageError(f"--device must be auto, cpu or cuda, not '{device}'")
    try:  # a file of the run that cannot be used raises src.analysis.UnreadableRun, a RunError: exit 1
        run = load_main_loop(save_path)
        models = {"last": run.model, "best": run.best_model}
    except FileNotFoundError as e:
        raise UsageError(str(e)) from None
    except CorruptCheckpoint as e:
        raise RunError(str(e)) from None
    if run.model is None:
        raise RunError(f"{save_path} has no checkpoint yet: nothing to evaluate")
    if not is_finished(run.status, run.config["n_epochs"]) and not allow_unfinished:
        raise UsageError(f"{save_path} is unfinished ({run.status.get('epochs_done')} of "
                         f"{run.config['n_epochs']} epochs); pass --allow-unfinished to evaluate it anyway")
    target = choose_device(device)
    config = run.config
    _, (x_test, y_test) = load_dataset(config["dataset"], data_dir, config["label_mode"])
    x_test, y_test = torch.from_numpy(x_test), torch.from_numpy(y_test)
    result = {"dataset": config["dataset"], "label_mode": config["label_mode"], "n_test": len(y_test),
              "epochs_done": run.status.get("epochs_done"), "iterations_done": run.status.get("iterations_done"),
              "last_model_checkpoint": run.checkpoint.name}
    names = class_names(config["dataset"], config["label_mode"], data_dir)  # from the archive's own meta file
    for name, model in models.items():
        if model is None:
            continue
        loss, accuracy, predicted = evaluate(model.to(target), x_test, y_test, target, "fp32")
        matrix = confusion_matrix(y_test.numpy(), predicted.numpy(), len(names))
        totals = matrix.sum(axis=1)
        per_class = np.where(totals > 0, matrix.diagonal() / np.maximum(totals, 1), np.nan)  # nan: no images
        result[f"{name}_test_loss"], result[f"{name}_test_acc"] = loss, accuracy
        result[f"{name}_per_class_acc"] = {c: (None if a != a else a) for c, a in zip(names, per_class.tolist(),
                                                                                        strict=True)}
        save_confusion(matrix, names, Path(save_path), name)
        print(f"{name} model: test accuracy {accuracy:.4f}, test loss {loss:.4f} ({len(y_test)} images); "
              f"worst class {names[np.nanargmin(per_class)]} {np.nanmin(per_class):.4f}")
    write_json(Path(save_path) / RESULT_FILE, result)
    print(f"saved {Path(save_path) / RESULT_FILE} and confusion_test_*.csv/png")


def confusion_matrix(true, predicted, n):
    """counts[i, j]: test images of class i predicted as j."""
    import numpy as np

    return np.bincount(true * n + predicted, minlength=n * n).reshape(n, n)


def save_confusion(matrix, names, folder, which):
    from src.files import atomic_write
    from src.plots import plot_confusion

    header = "true \\ predicted," + ",".join(names) + "\n"
    rows = "".join(f"{name}," + ",".join(map(str, row)) + "\n" for name, row in zip(names, matrix, strict=True))
    atomic_write(folder / f"confusion_test_{which}.csv", lambda f: f.write((header + rows).encode()))
    plot_confusion(matrix, names, folder / f"confusion_test_{which}.png",
                   title=f"{folder.name}: test confusion, {which} model")


if __name__ == "__main__":
    dispatch(main, description=__doc__)
