"""make bench runs and reports every row (a smoke test: speed itself is never asserted in tests)."""
import json

from conftest import REPO, run_script

BENCH_SCRIPT = REPO / "src" / "scripts" / "bench.py"


def test_bench_writes_every_measurement(tmp_path, data_dir):
    out = tmp_path / "bench.json"
    result = run_script(BENCH_SCRIPT, "--n-images", "1200", "--repeats", "1", "--steps", "2", "--out", out,
                        data_dir=data_dir)
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
    assert saved["environment"]["precision"] in ("fp32", "bf16")


def test_bench_models_counts_parameters_and_macs_and_times_the_step(tmp_path, data_dir):
    out = tmp_path / "models.json"
    result = run_script(REPO / "src" / "scripts" / "bench_models.py", "--steps", "1", "--only", "resnet20",
                        "--out", out, data_dir=data_dir)
    assert result.returncode == 0, result.stderr
    (row,) = json.loads(out.read_text())["models"]
    assert (row["config"], row["parameters"]) == ("resnet20", 269_722)  # He et al.'s count
    assert 40e6 < row["macs"] < 41e6 and row["images_per_second"] > 0
