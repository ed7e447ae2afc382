"""evaluate.py end to end: top-1/top-5, loss and ECE of the last, best and EMA models, test-time augmentation
beside the plain numbers, per-example predictions, reliability diagrams, class names, and the shift test
sets (CIFAR-10.1, CIFAR-10-C) written by the fixtures in the official layouts; then the run table."""
import json

import numpy as np
import pytest
import torch

from conftest import REPO, run_script
from shift_files import cifar10c_arrays, write_cifar10_1, write_cifar10c_folder
from src.analysis import load_main_loop, load_runs
from src.data import load_cifar
from src.evaluation import predict
from src.datasets.shift_sets import COMMON_CORRUPTIONS, CORRUPTIONS
from test_reporting import assert_real_picture

REPORT_SCRIPT = REPO / "src" / "scripts" / "report.py"
MODELS = ("last", "best", "ema")


@pytest.fixture
def ema_run(train_here, tmp_path):
    run = tmp_path / "runs" / "ema"
    result = train_here(run, "--ema=0.9", "--n_epochs=2")
    assert result.returncode == 0, result.stderr
    return run


def saved(run, test_set="test"):
    return json.loads((run / f"eval_{test_set}.json").read_text())


def test_every_model_gets_top5_loss_ece_and_tta_beside_the_plain_numbers(ema_run, evaluate_here, data_dir):
    plain_run = evaluate_here(ema_run)
    assert plain_run.returncode == 0, plain_run.stderr
    plain = saved(ema_run)
    result = evaluate_here(ema_run, "--tta=flip,flip+shift")
    assert result.returncode == 0, result.stderr
    augmented = saved(ema_run)
    assert plain["models"] == list(MODELS) and augmented["tta"] == ["flip", "flip+shift"]
    for which in MODELS:
        for metric in ("acc", "top5", "loss", "ece"):
            key = f"{which}_test_{metric}"
            assert augmented[key] == plain[key]  # reported beside, never replacing
            assert f"{key}_flip" in augmented and f"{key}_flip+shift" in augmented and f"{key}_flip" not in plain
        assert 0 <= plain[f"{which}_test_acc"] <= plain[f"{which}_test_top5"] <= 1 and 0 <= plain[
            f"{which}_test_ece"] <= 1
        bins = plain[f"{which}_test_reliability"]
        assert len(bins) == 15 and sum(b["count"] for b in bins) == 100
        assert_real_picture(ema_run / f"reliability_test_{which}.png")
        assert_real_picture(ema_run / f"confusion_test_{which}.png")
        assert f"{which} model: test accuracy {plain[f'{which}_test_acc']:.4f}" in plain_run.stdout
    assert "with --tta=flip+shift: accuracy" in result.stdout
    # the EMA's numbers are the EMA's: the checkpoint's average of the weights, not the raw weights
    _, (x, y) = load_cifar("cifar10", data_dir)
    ema_model = load_main_loop(ema_run).ema_model
    predicted = predict(ema_model, torch.from_numpy(x), "cpu").argmax(1).numpy()
    assert plain["ema_test_acc"] == pytest.approx(float((predicted == y).mean()))


def test_per_example_predictions_are_saved_compressed(ema_run, evaluate_here, data_dir):
    assert evaluate_here(ema_run, "--tta=flip").returncode == 0
    _, (_, y) = load_cifar("cifar10", data_dir)
    results = saved(ema_run)
    for which in MODELS:
        with np.load(ema_run / f"predictions_test_{which}.npz", allow_pickle=False) as arrays:
            assert arrays["logits"].dtype == np.float16 and arrays["logits"].shape == (100, 10)
            assert np.array_equal(arrays["labels"], y) and np.array_equal(arrays["indices"], np.arange(100))
            assert list(arrays["class_names"])[:2] == ["airplane", "automobile"]
            assert arrays["logits_flip"].shape == (100, 10)
            accuracy = float((arrays["logits"].astype(np.float32).argmax(1) == y).mean())
            assert accuracy == pytest.approx(results[f"{which}_test_acc"], abs=0.011)  # fp16 ties: one image


def test_cifar100_class_names_are_in_every_output(train_here, evaluate_here, tmp_path):
    run = tmp_path / "c100"
    assert train_here(run, "--n_epochs=1", config="cifar100").returncode == 0
    result = evaluate_here(run)
    assert result.returncode == 0, result.stderr
    results = saved(run)
    names = [f"fine_class_{i:02d}" for i in range(100)]  # what the test data's meta file names them
    assert results["class_names"] == names and list(results["best_per_class_acc"]) == names
    assert (run / "confusion_test_best.csv").read_text().splitlines()[0] == "true \\ predicted," + ",".join(names)
    with np.load(run / "predictions_test_best.npz", allow_pickle=False) as arrays:
        assert list(arrays["class_names"]) == names and arrays["logits"].shape == (100, 100)
    assert results["best_test_top5"] >= results["best_test_acc"]
    assert "worst class fine_class_" in result.stdout
    assert_real_picture(run / "confusion_test_best.png")
    # the shift sets are CIFAR-10's: refused for this run, and every bad option is one line, exit 2
    for args, fragment in (("--test_set=cifar10.1", "CIFAR-10 test set"), ("--test_set=imagenet", "--test_set"),
                           ("--tta=rotate", "--tta"), ("--corruptions=fog", "needs --test_set=cifar10c"),
                           ("--test_set=cifar10c --corruptions=rain", "unknown corruption rain")):
        refused = evaluate_here(run, *args.split())
        assert refused.returncode == 2 and fragment in refused.stderr and refused.stderr.count("\n") == 1, args


@pytest.fixture
def shift_data(data_dir, tmp_path):
    """Both shift sets in the official layouts, alone in a data folder of their own: evaluating on them needs no
    CIFAR-10 archive (their labels are in CIFAR-10's order, whose names the outputs carry)."""
    folder = tmp_path / "shift_data"
    folder.mkdir()
    images, labels = write_cifar10_1(folder, n=40)
    arrays = cifar10c_arrays(per_severity=4)
    write_cifar10c_folder(folder, arrays)
    return folder, (images, labels), arrays


def test_cifar10_1_gets_the_full_evaluation(ema_run, evaluate_here, shift_data):
    folder, (images, labels), _ = shift_data
    result = evaluate_here(ema_run, f"--data_dir={folder}", "--test_set=cifar10.1", "--tta=flip")
    assert result.returncode == 0, result.stderr
    results = saved(ema_run, "cifar10.1")
    assert results["test_set"] == "cifar10.1" and results["n_test"] == 40
    assert results["class_names"][:2] == ["airplane", "automobile"] and len(results["class_names"]) == 10
    assert list(folder.iterdir()) and not list(folder.glob("cifar-10*"))  # nothing of CIFAR-10 read or fetched
    best = load_main_loop(ema_run).best_model
    predicted = predict(best, torch.from_numpy(images.transpose(0, 3, 1, 2).copy()), "cpu").argmax(1).numpy()
    assert results["best_cifar10.1_acc"] == pytest.approx(float((predicted == labels).mean()))
    assert "best_cifar10.1_acc_flip" in results and "best_cifar10.1_ece" in results
    for name in ("confusion_cifar10.1_best.csv", "reliability_cifar10.1_ema.png", "predictions_cifar10.1_last.npz"):
        assert (ema_run / name).exists(), name
    assert "best model: cifar10.1 accuracy" in result.stdout
    assert not (ema_run / "eval_test.json").exists()  # the test set's own results are another file


def test_cifar10c_reports_every_corruption_and_severity_and_the_means(ema_run, evaluate_here, shift_data, data_dir):
    folder, _, arrays = shift_data
    some = evaluate_here(ema_run, f"--data_dir={folder}", "--test_set=cifar10c", "--corruptions=fog,snow")
    assert some.returncode == 0, some.stderr
    results = saved(ema_run, "cifar10c")
    assert results["corruptions"] == ["fog", "snow"] and results["n_per_severity"] == 4
    last = load_main_loop(ema_run).model
    x = torch.from_numpy(arrays["fog.npy"].transpose(0, 3, 1, 2).copy())
    right = predict(last, x, "cpu").argmax(1).numpy() == arrays["labels.npy"]
    expected = [float(right[4 * s:4 * s + 4].mean()) for s in range(5)]
    assert results["last_cifar10c_per_corruption"]["fog"] == pytest.approx(expected)
    every = results["last_cifar10c_per_corruption"]["fog"] + results["last_cifar10c_per_corruption"]["snow"]
    assert results["last_cifar10c_acc"] == pytest.approx(sum(every) / 10)
    assert len(results["last_cifar10c_per_severity"]) == 5 and "last_cifar10c_acc_common" not in results
    assert "severity 5" in some.stdout and "fog" in some.stdout

    everything = evaluate_here(ema_run, f"--data_dir={folder}", "--test_set=cifar10c")
    assert everything.returncode == 0, everything.stderr
    results = saved(ema_run, "cifar10c")
    assert list(results["best_cifar10c_per_corruption"]) == list(CORRUPTIONS)
    common = [a for c in COMMON_CORRUPTIONS for a in results["best_cifar10c_per_corruption"][c]]
    assert results["best_cifar10c_acc_common"] == pytest.approx(sum(common) / 75)
    table = run_script(REPORT_SCRIPT, ema_run.parent, data_dir=data_dir)
    assert table.returncode == 0 and "best_cifar10c_acc" in table.stdout.splitlines()[0]


def test_the_run_table_shows_model_size_and_test_results(ema_run, evaluate_here, data_dir):
    from src.networks.size import model_size
    from src.models import build_model

    meta = json.loads((ema_run / "meta.json").read_text())
    expected = model_size(build_model(load_main_loop(ema_run).config))
    assert (meta["parameters"], meta["macs_per_image"]) == (expected["parameters"], expected["macs_per_image"])
    assert meta["sessions"][-1]["parameters"] == expected["parameters"]
    assert evaluate_here(ema_run).returncode == 0
    runs = load_runs(ema_run.parent)
    assert runs["parameters"][0] == expected["parameters"] and runs["best_test_acc"][0] == saved(ema_run)[
        "best_test_acc"]
    assert runs["ema_test_ece"][0] == saved(ema_run)["ema_test_ece"]
    table = run_script(REPORT_SCRIPT, ema_run.parent, data_dir=data_dir)
    header, _, row = table.stdout.splitlines()
    cells = dict(zip(header.split(), row.split(), strict=True))
    assert cells["parameters"] == f"{expected['parameters']:,}"
    assert cells["best_test_acc"] == f"{saved(ema_run)['best_test_acc']:.4f}"
    assert header.split()[-5:] == ["epochs", "state", "best_valid_acc", "last_valid_acc", "training_hours"]
