"""Holes found by hostile and careless input (issue 23), each with the test that failed before its fix: one line,
the right exit code, and nothing silently wrong."""
import json
import sys

import pytest

from conftest import REPO, run_script

SWEEP_SCRIPT = REPO / "src" / "scripts" / "sweep.py"


@pytest.mark.slow
def test_an_edited_status_json_does_not_make_an_unfinished_run_finished(train_here, tmp_path):
    """status.json says finished_early (or more epochs than were done): the checkpoint decides, and a rerun with
    a larger n_epochs trains on, as the docs promise ("rebuilt from the checkpoint")."""
    run = tmp_path / "run"
    assert train_here(run, "--n_epochs=1").returncode == 0
    for edit in ({"finished_early": True}, {"epochs_done": 5, "n_epochs": 5}):
        status = json.loads((run / "status.json").read_text())
        (run / "status.json").write_text(json.dumps({**status, **edit}))
        epochs = len((run / "log.jsonl").read_text().splitlines()) + 1
        result = train_here(run, f"--n_epochs={epochs}")
        assert result.returncode == 0, result.stderr
        assert "already finished" not in result.stdout
        assert len((run / "log.jsonl").read_text().splitlines()) == epochs
        status = json.loads((run / "status.json").read_text())
        assert (status["epochs_done"], status["finished_early"], status["finished"]) == (epochs, False, True)
    again = train_here(run, f"--n_epochs={epochs}")  # truly finished: still the quick no-op
    assert again.returncode == 0 and "already finished" in again.stdout


@pytest.mark.slow
def test_a_model_key_that_is_not_a_name_is_one_line_everywhere(train_here, evaluate_here, data_dir, tmp_path):
    """`"model": ["fast"]` in a run's config.json: evaluate.py and sweep.py (also --dry_run, the folder being a
    point's) say so in one line instead of a TypeError traceback."""
    import subprocess

    from conftest import TINY, script_env

    sweep_dir = tmp_path / "grid"
    dry = subprocess.run([sys.executable, str(SWEEP_SCRIPT), "cifar10", str(sweep_dir), *TINY, "--n_epochs=1",
                          "--lr=0.1,0.2", "--dry_run"], cwd=REPO, capture_output=True, text=True,
                         env=script_env(data_dir), timeout=300)
    assert dry.returncode == 0, dry.stderr
    point = sweep_dir / dry.stdout.split(str(sweep_dir) + "/")[1].split()[0]
    assert train_here(point, "--n_epochs=1", "--lr=0.1").returncode == 0
    config = json.loads((point / "config.json").read_text())
    (point / "config.json").write_text(json.dumps({**config, "model": ["fast"]}))
    evaluated = evaluate_here(point)
    assert evaluated.returncode in (1, 2) and "Traceback" not in evaluated.stderr
    assert evaluated.stderr.count("\n") == 1 and "model" in evaluated.stderr
    for extra in (["--dry_run"], []):
        result = run_script(SWEEP_SCRIPT, "cifar10", sweep_dir, *TINY, "--n_epochs=1", "--lr=0.1,0.2", *extra,
                            data_dir=data_dir)
        assert "Traceback" not in result.stderr and "TypeError" not in result.stderr, result.stderr


def test_a_deeply_nested_planted_json_is_malformed_json_not_a_recursion_error(tmp_path):
    """A planted .submitit/array_*.json of 100,000 nested lists: the Slurm backend's record of its jobs skips
    it as unreadable (a RecursionError traceback in sweep.py --backend=slurm before)."""
    from src.files import read_json
    from src.sweep.slurm import recorded_jobs

    (tmp_path / ".submitit").mkdir()
    planted = tmp_path / ".submitit" / "array_1.json"
    planted.write_text("[" * 100_000 + "]" * 100_000)
    (tmp_path / ".submitit" / "array_2.json").write_text(json.dumps({"2_0": str(tmp_path / "run")}))
    with pytest.raises(ValueError, match="nested too deeply"):
        read_json(planted)
    assert recorded_jobs(tmp_path) == {"2_0": str(tmp_path / "run")}


def test_a_sweep_folder_with_a_percent_sign_is_refused_before_anything_is_written(data_dir, tmp_path):
    """submitit reads %j, %a, ... in its folder as placeholders: 'W/drop 50%all' gave a ValueError traceback, and
    'W/p%jq' failed every point and left a stray folder beside the sweep."""
    for name in ("drop 50%all", "p%jq"):
        result = run_script(SWEEP_SCRIPT, "cifar10", tmp_path / "W" / name, "--lr=0.1,0.2", "--n_epochs=1",
                            data_dir=data_dir)
        assert result.returncode == 2 and result.stderr.count("\n") == 1 and "%" in result.stderr, result.stderr
    assert not (tmp_path / "W").exists()


@pytest.mark.parametrize("family_name, override", [
    ("simple_cnn", "--mixup=inf"), ("simple_cnn", "--lr_decay=inf"), ("simple_cnn", "--lr=nan"),
    ("simple_cnn", "--plot_every_seconds=-inf"), ("fast", "--logit_scale=inf"), ("fast", "--bias_lr_scale=inf"),
])
def test_non_finite_numbers_are_refused_on_the_command_line_and_in_config_files(family_name, override, tmp_path):
    from configs import family
    from src.config import apply_overrides
    from src.errors import UsageError

    registry = family(family_name)
    key, text = override[2:].split("=")
    with pytest.raises(UsageError, match="finite"):
        apply_overrides(registry.root, {key: text})
    path = tmp_path / "config.json"
    path.write_text(f'{{"{key}": {text.replace("inf", "Infinity").replace("nan", "NaN")}}}')
    with pytest.raises(UsageError, match="finite"):
        registry.get(str(path))


def test_settings_that_cannot_train_as_meant_are_refused():
    """A linear warmup longer than the run (the lr never leaves ~0) and the fast net's bn_momentum=0 (running
    statistics frozen at their start, every validation wrong)."""
    from configs import family

    simple, fast = family("simple_cnn"), family("fast")
    config = {**simple.get("cifar10"), "n_epochs": 2}
    assert any("--warmup=1000 epochs is longer than the whole run" in p
               for p in simple.problems({**config, "warmup": 1000}))
    assert simple.problems({**config, "warmup": 2}) == []  # as long as the run: it climbs to --lr at the end
    assert simple.problems({**config, "warmup": 1000, "warmup_shape": "constant"}) == []  # trains at warmup_lr
    per_epoch = (50000 - config["valid_size"]) // config["batch_size"]
    iterations = {**config, "schedule_unit": "iterations"}
    assert simple.problems({**iterations, "warmup": 2 * per_epoch}) == []
    assert any("longer than the whole run" in p for p in simple.problems({**iterations, "warmup": 2 * per_epoch + 1}))
    assert any("--bn_momentum must be in (0, 1]" in p for p in fast.problems({**fast.get("fast"), "bn_momentum": 0.0}))
