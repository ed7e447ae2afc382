"""Test results of a run: python src/scripts/evaluate.py SAVE_PATH [--tta=flip] [--test_set=cifar10.1]

The only code in this project that reads test data. Evaluates the latest model, the best one (by
validation accuracy) and, when the run kept one, the EMA of the weights; writes SAVE_PATH/eval_<set>.json
(eval_test.json for the run's own test set) and, per model, the confusion matrix, a reliability diagram
and the per-example predictions (confusion_<set>_<model>.csv/png, reliability_<set>_<model>.png,
predictions_<set>_<model>.npz). --test_set=cifar10c reports accuracy per corruption and severity instead.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from anywhere, no PYTHONPATH

from src.signals import exit_at_once_on  # noqa: E402  (os and signal only: in place before the slow imports)

if __name__ == "__main__":
    exit_at_once_on("SIGINT", "SIGTERM")


from src.cli import dispatch, exit_codes  # noqa: E402
from src.errors import RunError, UsageError  # noqa: E402
from src.runs.names import eval_file, model_file  # noqa: E402

RESULT_FILE = eval_file("test")  # with --test_set=NAME: eval_NAME.json


@exit_codes
def main(save_path, *, data_dir=None, device="auto", allow_unfinished=False, test_set="test", tta=None,
         corruptions=None):
    """Evaluate the latest, the best and the EMA model of the run in SAVE_PATH on the test set (--test_set:
    test, cifar10.1 or cifar10c); --tta=flip, flip+shift, airbench or hiverge (or several, comma-separated) adds
    test-time-augmented numbers beside the plain ones; --corruptions=NAME,... limits cifar10c to some
    corruptions."""
    from src.datasets.cifar_files import CIFAR10_CLASSES
    from src.data import class_names, default_data_dir
    from src.training.hardware import choose_device

    ttas, chosen = check_options(device, test_set, tta, corruptions)
    run, models = load_run(save_path, allow_unfinished)
    config = run.config
    if test_set != "test" and (config["dataset"], config["label_mode"]) != ("cifar10", "fine"):
        raise UsageError(f"--test_set={test_set} is a CIFAR-10 test set; {save_path} trained on "
                         f"{config['dataset']} ({config['label_mode']} labels)")
    target = choose_device(device)
    data_dir = Path(data_dir) if data_dir is not None else default_data_dir()
    if test_set == "test":
        names = class_names(config["dataset"], config["label_mode"], data_dir)  # from the archive's own meta file
    else:  # the shift sets label in CIFAR-10's order; their own files hold no names (and no CIFAR-10 is needed)
        names = list(CIFAR10_CLASSES)
    result = {"dataset": config["dataset"], "label_mode": config["label_mode"], "test_set": test_set,
              "epochs_done": run.status.get("epochs_done"), "iterations_done": run.status.get("iterations_done"),
              "last_model_checkpoint": run.checkpoint.name, "models": list(models), "tta": ttas,
              "class_names": names}
    models = {which: model.to(target) for which, model in models.items()}
    if test_set == "cifar10c":
        from src.evaluation import evaluate_corruptions

        result.update(evaluate_corruptions(models, data_dir, chosen, ttas, target))
    else:
        x, y = load_test_set(test_set, config, data_dir)
        result["n_test"] = len(y)
        for which, model in models.items():
            result.update(evaluate_model(model, which, x, y, names, test_set, ttas, target, Path(save_path)))
    from src.files import write_json

    out = Path(save_path) / eval_file(test_set)
    write_json(out, result)
    print(f"saved {out}" + ("" if test_set == "cifar10c" else f" and confusion_, reliability_, predictions_"
                                                               f"{test_set}_*"))


def check_options(device, test_set, tta, corruptions):
    """-> (TTA modes, corruptions): the options, checked before anything is loaded."""
    from src.analysis import TEST_SETS  # the run table reads the same sets' results
    from src.evaluation import TTA_MODES
    from src.datasets.shift_sets import CORRUPTIONS

    if device not in ("auto", "cpu", "cuda"):
        raise UsageError(f"--device must be auto, cpu or cuda, not '{device}'")
    if test_set not in TEST_SETS:
        raise UsageError(f"--test_set must be one of {', '.join(TEST_SETS)}, not '{test_set}'")
    ttas = [mode for mode in (tta or "").split(",") if mode]
    for mode in ttas:
        if mode not in TTA_MODES:
            raise UsageError(f"--tta must be {', '.join(TTA_MODES)} (or several, comma-separated), not '{mode}'")
    if corruptions is not None and test_set != "cifar10c":
        raise UsageError("--corruptions needs --test_set=cifar10c")
    chosen = [c for c in (corruptions or "").split(",") if c] or list(CORRUPTIONS)
    unknown = [c for c in chosen if c not in CORRUPTIONS]
    if unknown:
        raise UsageError(f"unknown corruption {', '.join(unknown)}; CIFAR-10-C has {', '.join(CORRUPTIONS)}")
    return list(dict.fromkeys(ttas)), list(dict.fromkeys(chosen))


def load_run(save_path, allow_unfinished):
    """-> (the run, {"last": model, "best": model, "ema": model}: those the run has), or a one-line refusal."""
    from src.analysis import load_main_loop
    from src.runs.checkpoints import CorruptCheckpoint
    from src.runs.folder import is_finished

    try:  # a file of the run that cannot be used raises src.analysis.UnreadableRun, a RunError: exit 1
        run = load_main_loop(save_path)
        models = {"last": run.model, "best": run.best_model, "ema": run.ema_model}
    except FileNotFoundError as e:
        raise UsageError(str(e)) from None
    except CorruptCheckpoint as e:
        raise RunError(str(e)) from None
    if run.model is None:
        raise RunError(f"{save_path} has no checkpoint yet: nothing to evaluate")
    if not is_finished(run.status, run.config["n_epochs"]) and not allow_unfinished:
        raise UsageError(f"{save_path} is unfinished ({run.status.get('epochs_done')} of "
                         f"{run.config['n_epochs']} epochs); pass --allow-unfinished to evaluate it anyway")
    return run, {which: model for which, model in models.items() if model is not None}


def load_test_set(test_set, config, data_dir):
    """-> (x, y) as tensors: the run's own test set, or CIFAR-10.1."""
    import torch

    from src.data import load_dataset
    from src.datasets.shift_sets import load_cifar10_1

    if test_set == "cifar10.1":
        x, y = load_cifar10_1(data_dir)
    else:
        _, (x, y) = load_dataset(config["dataset"], data_dir, config["label_mode"])
    return torch.from_numpy(x), torch.from_numpy(y)


def evaluate_model(model, which, x, y, names, test_set, ttas, target, folder):
    """One model on one test set: its numbers as eval_<set>.json keeps them, and its files written."""
    import numpy as np

    from src.evaluation import confusion_matrix, predict_modes, scores

    every_logits = predict_modes(model, x, target, (None, *ttas))  # each view run once, shared by the modes
    logits = every_logits[None]
    plain = scores(logits, y)
    matrix = confusion_matrix(y.numpy(), logits.argmax(1).numpy(), len(names))
    totals = matrix.sum(axis=1)
    per_class = np.where(totals > 0, matrix.diagonal() / np.maximum(totals, 1), np.nan)  # nan: no images
    prefix = f"{which}_{test_set}_"
    result = {f"{prefix}{key}": value for key, value in plain.items()}
    result[f"{which}_per_class_acc"] = {c: (None if a != a else a) for c, a in zip(names, per_class.tolist(),
                                                                                   strict=True)}
    extra_logits = {}
    print(f"{which} model: {test_set} accuracy {plain['acc']:.4f}, top-5 {plain['top5']:.4f}, loss "
          f"{plain['loss']:.4f}, ECE {plain['ece']:.4f} ({len(y)} images); worst class "
          f"{names[np.nanargmin(per_class)]} {np.nanmin(per_class):.4f}")
    for mode in ttas:
        extra_logits[mode] = every_logits[mode]
        augmented = scores(extra_logits[mode], y)
        result.update({f"{prefix}{key}_{mode}": value for key, value in augmented.items()})
        print(f"  with --tta={mode}: accuracy {augmented['acc']:.4f}, top-5 {augmented['top5']:.4f}, "
              f"loss {augmented['loss']:.4f}, ECE {augmented['ece']:.4f}")
    save_outputs(folder, test_set, which, matrix, names, plain, logits, extra_logits, y)
    return result


def save_outputs(folder, test_set, which, matrix, names, plain, logits, extra_logits, labels):
    import numpy as np

    from src.files import atomic_write
    from src.runs.plots import plot_confusion, plot_reliability

    header = "true \\ predicted," + ",".join(names) + "\n"
    rows = "".join(f"{name}," + ",".join(map(str, row)) + "\n" for name, row in zip(names, matrix, strict=True))
    table = header + rows
    atomic_write(folder / model_file("confusion", test_set, which, ".csv"), lambda f: f.write(table.encode()))
    plot_confusion(matrix, names, folder / model_file("confusion", test_set, which, ".png"),
                   title=f"{folder.name}: {test_set} confusion, {which} model")
    plot_reliability(plain["reliability"], folder / model_file("reliability", test_set, which, ".png"),
                     title=f"{folder.name}: {which} model on {test_set}\naccuracy {plain['acc']:.4f}, "
                           f"ECE {plain['ece']:.4f} (15 bins)")
    # float16 keeps logits to 3 significant digits, which every score here survives, at half the size
    arrays = {"logits": logits.numpy().astype(np.float16), "labels": labels.numpy(),
              "indices": np.arange(len(labels), dtype=np.int64), "class_names": np.array(names)}
    arrays.update({f"logits_{mode.replace('+', '_')}": z.numpy().astype(np.float16)
                   for mode, z in extra_logits.items()})
    atomic_write(folder / model_file("predictions", test_set, which, ".npz"),
                 lambda f: np.savez_compressed(f, **arrays))


if __name__ == "__main__":
    dispatch(main, description=__doc__)
