"""search.py: the space, a local search that prunes at rungs, exact trials (against the plain runner and after
kill -9), a preempted trial on Slurm, and bad input. Real Optuna, real SQLite, the real one-node Slurm."""
import json
import os
import random
import shutil
import signal
import subprocess
import sys

import pytest

from conftest import REPO, TINY, TRAIN_SCRIPT, assert_identical, run_script, script_env, wait_for_mid_epoch_checkpoint
from configs.simple_cnn import simple_cnn_configs
from src.errors import UsageError
from src.extensions.search_trial import make_pruner, open_storage
from src.sweep.search import Search, default_storage
from src.sweep.space import check_space, parse_space
from test_slurm import released  # noqa: F401  (requeued jobs start again at once)

SEARCH_SCRIPT = REPO / "src" / "scripts" / "search.py"
ROOT = simple_cnn_configs.root
# Four epochs: ASHA's rungs (reduction factor 3) fall at epochs 1 and 3. Dropout and mid-epoch checkpoints, as
# conftest's RESUMABLE, so that exactness needs the per-iteration seeding and the kills land mid-epoch.
FIXED = [w for w in TINY if not w.startswith("--n_epochs")] + ["--n_epochs=4", "--dropout=0.5",
                                                                "--checkpoint_every_n_batches=4"]
SPACE = ["--lr=log:0.01:0.5", "--weight_decay=1e-4,5e-4"]
N_TRIALS = 4


def search(data_dir, *args, wait=True, **extra_env):
    command = [sys.executable, str(SEARCH_SCRIPT), *map(str, args)]
    env = script_env(data_dir, **extra_env)
    if wait:
        return subprocess.run(command, cwd=REPO, capture_output=True, text=True, env=env, timeout=600)
    return subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)


def search_args(folder, *extra):
    return ["cifar10", folder, *FIXED, *SPACE, f"--n_trials={N_TRIALS}", "--pruner=asha", *extra]


def trials_of(folder, storage=None):
    """{number: (state, intermediate values by epoch)}, read back by Optuna from the search's storage."""
    import optuna

    study = optuna.load_study(study_name="search", storage=open_storage(storage or default_storage(folder)))
    return {t.number: (t.state.name, dict(t.intermediate_values)) for t in study.get_trials()}


def epochs_done(run):
    return json.loads((run / "status.json").read_text())["epochs_done"]


@pytest.fixture(scope="module")
def searched(data_dir, tmp_path_factory):
    """An uninterrupted local search, one trial at a time: the reference for the others."""
    folder = tmp_path_factory.mktemp("search") / "lr"
    done = search(data_dir, *search_args(folder))
    assert done.returncode == 0, done.stderr[-3000:]
    return folder, done


# The space: fast, in this process.

def test_the_space_is_typed_by_the_root_config():
    dimensions, fixed = parse_space({"lr": "log:0.01:0.5", "n_filters": "16:64", "dropout": "int:0:1",
                                     "weight_decay": "1e-4,5e-4", "batch_size": "64"}, ROOT)
    by_key = {d.key: d for d in dimensions}
    assert (by_key["lr"].kind, by_key["lr"].log, by_key["lr"].low, by_key["lr"].high) == ("float", True, 0.01, 0.5)
    assert (by_key["n_filters"].kind, by_key["n_filters"].low, by_key["n_filters"].high) == ("int", 16, 64)
    assert by_key["dropout"].kind == "int" and by_key["dropout"].corners(ROOT) == [0.0, 1.0]  # a float key's ints
    assert by_key["weight_decay"].corners(ROOT) == [1e-4, 5e-4]
    assert fixed == {"batch_size": 64}


@pytest.mark.parametrize("key, text, needle", [
    ("n_filter", "8:16", "unknown config key 'n_filter'"),
    ("n_filters", "8.5:16", "integers"),
    ("lr", "0.5:0.1", "low end must be below"),
    ("lr", "log:0:0.5", "above 0"),
    ("lr", "log:a:0.5", "'a' is not a number"),
    ("augment", "int:1:2", "a range needs a number key"),
    ("n_epochs", "2:8", "cannot be searched"),
    ("lr", "0.1,0.1", "twice"),
    ("n_filters", "8,x", "bad value 'x'"),
])
def test_a_malformed_space_is_one_line(key, text, needle):
    with pytest.raises(UsageError) as excinfo:
        parse_space({key: text}, ROOT)
    assert needle in str(excinfo.value) and "\n" not in str(excinfo.value)


def test_a_space_invalid_at_its_corners_is_refused():
    dimensions, fixed = parse_space({"dropout": "0:1.5"}, ROOT)
    with pytest.raises(UsageError, match="invalid points"):
        check_space(dimensions, fixed, ROOT, simple_cnn_configs.problems)


@pytest.fixture
def search_here(monkeypatch, capsys):
    """search.py's main in this process (its import sets PYTHONPATH for its jobs: restored after the test)."""
    monkeypatch.setenv("PYTHONPATH", os.environ.get("PYTHONPATH", ""))
    from src.scripts.search import main

    def run(*args):
        capsys.readouterr()
        with pytest.raises(SystemExit) as exit_info:
            main([str(a) for a in args])
        out, err = capsys.readouterr()
        return subprocess.CompletedProcess([], exit_info.value.code, out, err)

    return run


def test_each_pruner_judges_at_the_rungs_it_is_given():
    import optuna

    asha = make_pruner("asha", 2, 18)
    assert isinstance(asha, optuna.pruners.SuccessiveHalvingPruner)
    assert (asha._min_resource, asha._reduction_factor) == (2, 3)
    hyperband = make_pruner("hyperband", 1, 27)
    assert (hyperband._min_resource, hyperband._max_resource, hyperband._reduction_factor) == (1, 27, 3)
    median = make_pruner("median", 3, 9)
    assert isinstance(median, optuna.pruners.MedianPruner) and median._n_warmup_steps == 3
    assert isinstance(make_pruner("none", 1, 9), optuna.pruners.NopPruner)


def test_a_journal_file_is_named_as_optuna_dashboard_names_one():
    from src.extensions.search_trial import journal_path

    assert journal_path("journal:/shared/s/journal.log") == "/shared/s/journal.log"
    assert journal_path("journal:///shared/s/j") == "/shared/s/j"
    assert journal_path("results/s/optuna.log") == "results/s/optuna.log"
    assert journal_path("sqlite:///results/s/search.db") is None and journal_path("results/s.db") is None


def test_a_drawn_point_the_family_refuses_fails_its_trial_before_it_starts(tmp_path):
    dimensions, fixed = parse_space({"dropout": "0.5,1.5", "lr": "0.01:0.1"}, ROOT)
    record = {"config": "cifar10", "family": "simple_cnn", "space": {}, "fixed": {}, "metric": "valid_acc",
              "pruner": "asha", "min_epochs": 1, "sampler": "random", "seed": 3, "study": "search",
              "storage": ""}
    found = Search(tmp_path, record, dimensions, fixed, ROOT, simple_cnn_configs)
    found.open_study()
    prepared = [found.prepare() for _ in range(8)]
    trials = found.trials()
    assert [t.number for t in trials] == list(range(8))
    for trial, ready in zip(trials, prepared, strict=True):
        if trial.params["dropout"] == "1.5":
            assert ready is None and trial.state.name == "FAIL" and "dropout" in trial.user_attrs["error"]
        else:
            assert ready[0] == trial.number and "--dropout=0.5" in ready[1] and trial.state.name == "RUNNING"
    assert {t.params["dropout"] for t in trials} == {"0.5", "1.5"}
    again = Search(tmp_path, record, dimensions, fixed, ROOT, simple_cnn_configs)
    again.open_study()
    running = next(number for number, ready in enumerate(prepared) if ready is not None)
    assert again.prepare(number=running) == prepared[running]  # drawn again after a kill: the same point


def test_bad_search_usage_writes_nothing(search_here, tmp_path):
    folder = tmp_path / "s"
    for args, needle in (
        (["--lr=log:0:1"], "above 0"),
        (["--n_filter=8:16"], "unknown config key"),
        (["--lr=0.1", "--n_epochs=2"], "nothing to search"),
        (["--lr=0.01:0.1", "--storage=sqlite:////no/such/dir/s.db"], "cannot open the storage"),
        (["--lr=0.01:0.1", "--storage=postgresql://127.0.0.1:1/nothing"], "cannot open the storage"),
        (["--lr=0.01:0.1", "--pruner=asap"], "--pruner must be one of"),
        (["--lr=0.01:0.1", "--valid_size=0"], "validation split"),
        (["--lr=0.01:0.1", "--min_epochs=5", "--n_epochs=4"], "beyond n_epochs"),
    ):
        result = search_here("cifar10", folder, *args)
        assert result.returncode == 2, (args, result.stderr)
        assert result.stderr.count("\n") == 1 and needle in result.stderr, (args, result.stderr)
        assert not folder.exists() and not (tmp_path / "no").exists()


def test_a_second_driver_on_the_same_search_is_refused(search_here, tmp_path):
    from src.files import RunFolderLock

    folder = tmp_path / "busy"
    folder.mkdir()
    held = RunFolderLock(folder, kind="search folder").acquire()  # as a driver running there holds it
    try:
        refused = search_here("cifar10", folder, *FIXED, *SPACE)
    finally:
        held.release()
    assert refused.returncode == 1 and refused.stderr.count("\n") == 1
    assert f"search folder {folder} is in use by process {os.getpid()}" in refused.stderr
    assert sorted(p.name for p in folder.iterdir()) == [".lock"]  # no study, no record, no trial


# A local search, end to end.

def test_a_local_search_prunes_at_rungs_and_its_trials_are_plain_runs(searched, data_dir, tmp_path):
    folder, done = searched
    trials = trials_of(folder)
    assert sorted(trials) == list(range(N_TRIALS))
    states = {number: state for number, (state, _) in trials.items()}
    assert set(states.values()) == {"COMPLETE", "PRUNED"}, states  # this seed's space has both
    for number, (state, values) in trials.items():
        run = folder / f"trial_{number:04d}"
        epochs = epochs_done(run)
        assert epochs == (4 if state == "COMPLETE" else max(values)) and sorted(values) == list(range(1, epochs + 1))
        if state == "PRUNED":
            assert epochs in (1, 3)  # ASHA's rungs
            assert json.loads((run / "status.json").read_text())["pruned_at_epoch"] == epochs
    assert (folder / "history.png").stat().st_size > 0 and (folder / "params.png").stat().st_size > 0
    # The best trial's command, as printed, trains the same weights bit for bit.
    best = max((n for n, (state, _) in trials.items() if state == "COMPLETE"), key=lambda n: trials[n][1][4])
    assert f"best: trial {best}, valid_acc" in done.stdout
    command = done.stdout.split("to train it again:\n")[1].split()
    assert command[:4] == ["python", "src/scripts/train_simple_CNN.py", "cifar10", f"{folder}_best"]
    plain = run_script(TRAIN_SCRIPT, "cifar10", tmp_path / "best", *command[4:], data_dir=data_dir)
    assert plain.returncode == 0, plain.stderr
    assert_identical(folder / f"trial_{best:04d}", tmp_path / "best")


def test_a_pruned_trial_trained_on_by_the_runner_equals_the_plain_run(searched, data_dir, tmp_path):
    folder, _ = searched
    pruned = next(n for n, (state, _) in sorted(trials_of(folder).items()) if state == "PRUNED")
    copy = tmp_path / "pruned"
    shutil.copytree(folder / f"trial_{pruned:04d}", copy)
    arguments = json.loads((copy / "config.json").read_text())
    point = [f"--lr={arguments['lr']!r}", f"--weight_decay={arguments['weight_decay']!r}"]
    on = run_script(TRAIN_SCRIPT, "cifar10", copy, *FIXED, *point, data_dir=data_dir)
    assert on.returncode == 0, on.stderr
    assert "resuming from" in on.stdout and epochs_done(copy) == 4
    plain = run_script(TRAIN_SCRIPT, "cifar10", tmp_path / "plain", *FIXED, *point, data_dir=data_dir)
    assert plain.returncode == 0, plain.stderr
    assert_identical(copy, tmp_path / "plain")


def test_report_shows_the_trials_with_their_states_wherever_the_folder_went(searched, data_dir, tmp_path):
    folder, _ = searched
    moved = tmp_path / "moved"
    shutil.copytree(folder, moved)  # its study in its own search.db, found where the folder is now
    shown = run_script(REPO / "src" / "scripts" / "report.py", moved, data_dir=data_dir)
    assert shown.returncode == 0, shown.stderr
    assert "pruned" in shown.stdout and "search trials (valid_acc, best first)" in shown.stdout
    assert "to train it again" in shown.stdout


def test_a_rerun_of_a_finished_search_runs_nothing_and_another_space_is_refused(searched, data_dir):
    folder, _ = searched
    before = (folder / "search.json").read_text(), trials_of(folder)
    again = search(data_dir, *search_args(folder))
    assert again.returncode == 0, again.stderr and "started" not in again.stdout
    assert "started" not in again.stdout and trials_of(folder) == before[1]
    other = search(data_dir, "cifar10", folder, *FIXED, "--lr=log:0.01:0.9", f"--n_trials={N_TRIALS}")
    assert other.returncode == 2 and "holds another search" in other.stderr and other.stderr.count("\n") == 1
    assert (folder / "search.json").read_text() == before[0] and trials_of(folder) == before[1]


def test_a_search_killed_anywhere_ends_with_the_same_trials_bit_for_bit(searched, data_dir, tmp_path):
    """kill -9 of the driver, its job and the running trial: once mid-epoch in trial 1, once at a random moment
    of the rerun; the third run finishes the search. Trials resume as themselves, none is counted twice, and
    each equals the uninterrupted search's trial of the same number bit for bit."""
    reference, _ = searched
    folder = tmp_path / "lr"
    first = search(data_dir, *search_args(folder), wait=False)
    wait_for_mid_epoch_checkpoint(first, folder / "trial_0001")
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    second = search(data_dir, *search_args(folder), wait=False)
    try:
        second.wait(timeout=random.Random(os.getpid()).uniform(3, 15))
    except subprocess.TimeoutExpired:
        os.killpg(second.pid, signal.SIGKILL)
        second.wait()
    third = search(data_dir, *search_args(folder))
    assert third.returncode == 0, third.stderr[-3000:]
    assert "resuming from" in (folder / "trial_0001" / "stdout.log").read_text()
    assert trials_of(folder) == trials_of(reference)
    assert sorted(p.name for p in folder.glob("trial_*")) == sorted(p.name for p in reference.glob("trial_*"))
    for run in reference.glob("trial_*"):
        assert_identical(run, folder / run.name)


@pytest.mark.slurm
def test_a_preempted_trial_on_slurm_resumes_as_the_same_trial(searched, data_dir, tmp_path, released):  # noqa: F811
    """`scancel --signal=USR2 --batch` on the running trial's job: it checkpoints, is requeued and resumes; the
    search ends with its trials, none duplicated, each equal to the local search's."""
    from test_slurm import SLOW, SLURM, job_of, unique

    reference, _ = searched
    folder = unique(tmp_path, "search")
    released.add(folder.name)
    # One trial at a time, as the reference ran: the second trial's rung is judged against the first's.
    # A journal file, as Optuna advises for clusters' shared file systems.
    journal = f"journal:{tmp_path / 'journal.log'}"
    process = search(data_dir, *search_args(folder), *SLURM, "--n_trials=2", "--array_parallelism=1",
                     f"--storage={journal}", wait=False, **SLOW)
    run = folder / "trial_0000"
    job = job_of(folder, run)
    wait_for_mid_epoch_checkpoint(process, run)
    subprocess.run(["scancel", "--signal=USR2", "--batch", job], check=True, timeout=30)
    out, err = process.communicate(timeout=400)
    assert process.returncode == 0, err[-3000:]
    assert "stopped at iteration" in (run / "stderr.log").read_text()
    assert "resuming from" in (run / "stdout.log").read_text()
    trials = trials_of(folder, journal)
    assert sorted(trials) == [0, 1] and sorted(p.name for p in folder.glob("trial_*")) == ["trial_0000", "trial_0001"]
    reference_trials = trials_of(reference)
    for number in (0, 1):
        assert trials[number] == reference_trials[number]
        assert_identical(reference / f"trial_{number:04d}", folder / f"trial_{number:04d}")
