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
