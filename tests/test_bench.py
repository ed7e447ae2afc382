"""make bench runs and reports every row (a smoke test: speed itself is never asserted in tests)."""
import json

from conftest import REPO, run_script

BENCH_SCRIPT = REPO / "src" / "scripts" / "bench.py"


def test_bench_writes_every_measurement(tmp_path, data_dir):
    out = tmp_path / "bench.json"
    import torch

    quick_compile = ["--compile-modes", "default"] if torch.cuda.is_available() else []  # max-autotune: minutes
    result = run_script(BENCH_SCRIPT, "--n-images", "1200", "--repeats", "1", "--steps", "2", "--out", out,
                        "--epoch-costs-of", "cifar10,resnet20", *quick_compile, data_dir=data_dir)
    assert result.returncode == 0, result.stderr
    saved = json.loads(out.read_text())
    medians = saved["medians"]
    for key in ("bare_fp32", "bare_best", "bare_best_one_thread", "stream_only", "end_to_end_epoch",
                "end_to_end_training", "per_sample_reference", "evaluation", "checkpoint_ms", "ratio",
                "recipe_off", "recipe_on", "recipe_fraction"):
        assert medians[key] > 0, key
    assert abs(medians["ratio"] - medians["bare_best"] / medians["end_to_end_epoch"]) < 1e-9
    # The full recipe (EMA, mixup, cutout, label smoothing) as a fraction of the plain step, measured alike.
    assert abs(medians["recipe_fraction"] - medians["recipe_on"] / medians["recipe_off"]) < 1e-9
    assert "(h) stream + step, + EMA, mixup, cutout, label smoothing" in result.stdout
    assert "(h) the full recipe runs at" in result.stdout
    assert result.stdout.strip().splitlines()[-1].startswith("ratio (end-to-end epoch time")
    assert saved["environment"]["precision"] in ("fp32", "bf16", "fp16")
    # Issue 13: the per-epoch fixed cost, in seconds and as a share of each model's training epoch.
    costs = saved["epoch_costs"]
    assert [row["config"] for row in costs["models"]] == ["cifar10", "resnet20"]
    for row in costs["models"]:
        parts = ("validation", "best_model", "checkpoint", "tensorboard")
        assert all(row[part] > 0 for part in parts) and row["training_epoch"] > 0
        assert row["fixed"] == sum(row[part] for part in parts)
        assert row["share"] == row["fixed"] / row["training_epoch"]
    assert costs["curves_drawing"] > 0 and costs["plot_every_seconds"] == 60
    assert costs["curves_share_at_most"] == costs["curves_drawing"] / 60
    assert medians["loop_fixed_seconds"] > 0 and medians["loop_fixed_share"] > 0
    assert "per-epoch fixed cost" in result.stdout and "curves.png:" in result.stdout
    # fp16 and torch.compile's modes are CUDA rows; on a CPU they say they were skipped.
    cuda = saved["environment"]["device"].startswith("cuda")
    assert (medians["bare_fp16"] is not None) == cuda
    assert list(saved["compile"]) == ["default"] if cuda else saved["compile"] is None
    if cuda:
        assert saved["compile"]["default"]["compile_seconds"] > 0
        assert "torch.compile mode=default:" in result.stdout
    assert ("skipped on a CPU" in result.stdout) != cuda


def test_bench_models_counts_parameters_and_macs_and_times_the_step(tmp_path, data_dir):
    out = tmp_path / "models.json"
    result = run_script(REPO / "src" / "scripts" / "bench_models.py", "--steps", "1", "--only", "resnet20",
                        "--out", out, data_dir=data_dir)
    assert result.returncode == 0, result.stderr
    (row,) = json.loads(out.read_text())["models"]
    assert (row["config"], row["parameters"]) == ("resnet20", 269_722)  # He et al.'s count
    assert 40e6 < row["macs"] < 41e6 and row["images_per_second"] > 0


def test_bench_epoch_times_a_steady_epoch_from_outside_against_every_bare_variant(tmp_path):
    out = tmp_path / "epoch.json"
    result = run_script(REPO / "src" / "scripts" / "bench_epoch.py", "--repeats", "1", "--n-images", "1000",
                        "--steps", "2", "--out", out, data_dir=tmp_path)
    assert result.returncode == 0, result.stderr
    saved = json.loads(out.read_text())
    assert saved["environment"]["cpu_capability"] and saved["epoch_seconds"] > 0
    assert saved["fastest"] in saved["bare"] and "fp32 channels_last" in saved["bare"]
    assert saved["loop_kernels"] in saved["bare"] and saved["chosen_by"] in ("trial", "rule")
    share = saved["epoch_images"] / saved["bare"][saved["fastest"]] / saved["epoch_seconds"]
    assert abs(saved["share_of_fastest_bare_step"] - share) < 1e-9
    own = saved["epoch_images"] / saved["bare"][saved["loop_kernels"]] / saved["epoch_seconds"]
    assert abs(saved["share_of_own_bare_step"] - own) < 1e-9
    assert "of the fastest bare step" in result.stdout.splitlines()[-1]
