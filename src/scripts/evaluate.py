"""Test accuracy and loss of a run: python src/scripts/evaluate.py SAVE_PATH

The only code in this project that reads the test set. Writes SAVE_PATH/eval_test.json.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from anywhere, no PYTHONPATH

from src.cli import dispatch, exit_codes  # noqa: E402
from src.errors import RunError, UsageError  # noqa: E402

RESULT_FILE = "eval_test.json"


@exit_codes
def main(save_path, *, data_dir=None, device="auto", allow_unfinished=False):
    """Evaluate the latest and the best model of the run in SAVE_PATH on the test set."""
    import torch

    from src.analysis import load_main_loop
    from src.checkpoint import CorruptCheckpoint
    from src.data import load_cifar
    from src.evaluation import evaluate
    from src.files import write_json
    from src.hardware import choose_device

    if device not in ("auto", "cpu", "cuda"):
        raise UsageError(f"--device must be auto, cpu or cuda, not '{device}'")
    try:
        run = load_main_loop(save_path)
        models = {"last": run.model, "best": run.load_best_model()}
    except FileNotFoundError as e:
        raise UsageError(str(e)) from None
    except CorruptCheckpoint as e:
        raise RunError(str(e)) from None
    if run.model is None:
        raise RunError(f"{save_path} has no checkpoint yet: nothing to evaluate")
    if not run.status.get("finished") and not allow_unfinished:
        raise UsageError(f"{save_path} is unfinished ({run.status.get('epochs_done')} of "
                         f"{run.config['n_epochs']} epochs); pass --allow-unfinished to evaluate it anyway")
    target = choose_device(device)
    config = run.config
    _, (x_test, y_test) = load_cifar(config["dataset"], data_dir, config["label_mode"])
    x_test, y_test = torch.from_numpy(x_test), torch.from_numpy(y_test)
    result = {"dataset": config["dataset"], "label_mode": config["label_mode"], "n_test": len(y_test),
              "epochs_done": run.status.get("epochs_done"), "iterations_done": run.status.get("iterations_done")}
    for name, model in models.items():
        if model is None:
            continue
        loss, accuracy, _ = evaluate(model.to(target), x_test, y_test, target, "fp32")
        result[f"{name}_test_loss"], result[f"{name}_test_acc"] = loss, accuracy
        print(f"{name} model: test accuracy {accuracy:.4f}, test loss {loss:.4f} ({len(y_test)} images)")
    write_json(Path(save_path) / RESULT_FILE, result)
    print(f"saved {Path(save_path) / RESULT_FILE}")


if __name__ == "__main__":
    dispatch(main, description=__doc__)
