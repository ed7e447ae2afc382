"""Bad input and interruptions give one line and the right exit code, never a traceback (issue 9, items 10 and 13).

evaluate.py on damaged run folders, configs that the runner must refuse before writing anything, report.py on
absurd run files, sweeps with bad grids or without Slurm, a failed point's reason, Ctrl-C while the scripts
import, and SIGTERM/SIGINT to a local sweep, which must stop its runs with a checkpoint rather than orphan them.
"""
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import EVALUATE_SCRIPT, REPO, TINY, TRAIN_SCRIPT, in_process, script_env, wait_until_catching
from configs.simple_cnn import MAX_PARAMETERS, simple_cnn_configs, simple_cnn_parameters, validate
from src.analysis import UnreadableRun, load_main_loop, load_runs
from src.cli import dispatch_with_overrides
from src.config import ConfigRegistry, apply_overrides
from src.errors import RunError, UsageError

REPORT_SCRIPT = REPO / "src" / "scripts" / "report.py"
SWEEP_SCRIPT = REPO / "src" / "scripts" / "sweep.py"
DEEP = "[" * 100000 + "]" * 100000  # json raises RecursionError on it


def one_line(result, code):
    """The process (or in-process call) ended with `code` and one line on stderr, no traceback."""
    assert result.returncode == code, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line and not line.startswith("warning: ")]
    assert len(lines) == 1, result.stderr
    return lines[0]


@pytest.fixture(scope="module")
def finished(tmp_path_factory, data_dir):
    """A finished one-epoch run with the TINY settings (it has a checkpoint and a best model)."""
    from src.main_loop import run_main_loop
    from src.models import build_simple_cnn

    path = tmp_path_factory.mktemp("finished") / "run"
    config = apply_overrides(simple_cnn_configs.get("cifar10"), dict(w[2:].split("=", 1) for w in TINY))
    saved = os.environ.get("DATA_DIR")
    os.environ["DATA_DIR"] = str(data_dir)
    try:
        assert run_main_loop({**config, "n_epochs": 1}, path, build_simple_cnn) == 0
    finally:
        if saved is None:
            del os.environ["DATA_DIR"]
        else:
            os.environ["DATA_DIR"] = saved
    return path


@pytest.fixture
def damaged(finished, tmp_path):
    """damaged(file, content) -> a copy of the finished run with `file` replaced (text, or a torch object)."""

    def make(name, content):
        run = tmp_path / f"run{len(list(tmp_path.iterdir()))}"
        shutil.copytree(finished, run)
        if isinstance(content, str):
            (run / name).write_text(content)
        else:
            torch.save(content, run / name)
        return run

    return make


def edited_config(finished, **changes):
    return json.dumps({**json.loads((finished / "config.json").read_text()), **changes})


# ---------------------------------------------------------------- evaluate.py on damaged run folders


@pytest.mark.parametrize(("name", "content", "fragment"), [
    ("config.json", "{not json", "config.json is not valid JSON"),
    ("config.json", "[1, 2]", "config.json holds a JSON array, not an object"),
    ("config.json", DEEP, "config.json nests lists or dicts too deeply"),
    ("status.json", "{not json", "status.json is not valid JSON"),
    ("status.json", '"finished"', "status.json holds a JSON string"),
    ("status.json", '{"epochs_done": NaN, "finished": true}', "status.json: epochs_done is NaN, not a count"),
    ("log.jsonl", '{"epoch": 1}\n{oops\n', "log.jsonl line 2 is not valid JSON"),
    ("log.jsonl", '{"epoch": 1}\n[1, 2]\n', "log.jsonl line 2 is a JSON array, not an object"),
    ("log.jsonl", '{"epoch": 1, "valid_acc": "high"}\n', 'log.jsonl line 1: valid_acc is "high", not a number'),
])
def test_evaluate_names_a_damaged_run_file_in_one_line(damaged, evaluate_here, name, content, fragment):
    line = one_line(evaluate_here(damaged(name, content)), 1)
    assert line.startswith("error: ") and fragment in line


def test_evaluate_names_config_keys_of_the_wrong_type_or_value(finished, damaged, evaluate_here):
    wrong_type = one_line(evaluate_here(damaged("config.json", edited_config(finished, n_filters="4"))), 1)
    assert "config.json: bad value '4' for --n_filters: expected int" in wrong_type
    coarse = one_line(evaluate_here(damaged("config.json", edited_config(finished, label_mode="coarse"))), 1)
    assert "config.json: --label_mode=coarse needs --dataset=cifar100" in coarse


def test_evaluate_refuses_weights_that_do_not_fit_the_config(finished, damaged, evaluate_here):
    """config.json edited to another width, or a key missing (it takes the root's value, 32 filters)."""
    for config in (edited_config(finished, n_filters=8),
                   json.dumps({k: v for k, v in json.loads(edited_config(finished)).items() if k != "n_filters"})):
        line = one_line(evaluate_here(damaged("config.json", config)), 1)
        assert "checkpoint_15.pt does not fit the model that" in line and "size mismatch for 1.0.weight" in line


@pytest.mark.parametrize("weights", [
    torch.zeros(3),  # a tensor
    {"a": 1, "b": "text"},  # a dict of non-tensors
    torch.nn.Linear(2, 3).state_dict(),  # another model's weights
], ids=["tensor", "non-tensors", "another-model"])
def test_evaluate_refuses_a_foreign_best_model(damaged, evaluate_here, weights):
    line = one_line(evaluate_here(damaged("best_model.pt", weights)), 1)
    assert "best_model.pt does not fit the model that" in line


def test_notebooks_get_a_clear_exception_and_the_table_skips_the_run(finished, damaged):
    run = damaged("config.json", edited_config(finished, n_filters=8))
    with pytest.raises(UnreadableRun, match="does not fit the model") as info:
        load_main_loop(run)
    assert isinstance(info.value, RunError) and isinstance(info.value, ValueError)
    ok = load_main_loop(finished)  # the contract is unchanged for a good run
    assert ok.config["n_filters"] == 4 and list(ok.log["epoch"]) == [1] and ok.status["finished"]
    (run / "log.jsonl").write_text('{"epoch": 1}\n[1]\n')
    assert load_runs(run.parent).attrs["skipped"][0][0] == run.name


# ---------------------------------------------------------------- configs the runner refuses before writing


@pytest.mark.parametrize("override", ["--label_mode=coarse", "--n_filters=100000000", f"--dim_dense={10**12}",
                                      f"--batch_size={10**9}"])
def test_impossible_configs_are_refused_before_anything_is_written(train_here, tmp_path, override):
    run = tmp_path / "run"
    line = one_line(train_here(run, override), 2)
    assert override.split("=")[0] in line
    assert not run.exists()


def test_size_limits_explain_themselves_and_allow_real_models():
    config = simple_cnn_configs.get("cifar10")
    problems = validate({**config, "n_filters": 100000000})
    assert len(problems) == 1 and "9e+17 parameters" in problems[0] and f"{MAX_PARAMETERS:,}" in problems[0]
    assert "2.06e+15 parameters" in validate({**config, "dim_dense": 10**12})[0]
    assert validate({**config, "n_filters": 512, "n_layers": 5}) == []  # large (0.4e9 parameters) but legal
    assert validate({**config, "batch_size": 50000}) == []


@pytest.mark.parametrize("name", ["cifar10", "cifar100", "cifar100_coarse"])
def test_the_parameter_count_matches_the_built_model(name):
    from src.models import build_simple_cnn

    for n_layers, batch_norm in ((1, True), (3, False), (5, True)):
        config = {**simple_cnn_configs.get(name), "n_layers": n_layers, "batch_norm": batch_norm, "n_filters": 5,
                  "dim_dense": 7}
        assert simple_cnn_parameters(config) == sum(p.numel() for p in build_simple_cnn(config).parameters())


def test_the_label_sets_match_the_data_module():
    from configs.simple_cnn import CLASSES
    from src.data import DATASETS

    assert CLASSES == {(name, mode): n for name, spec in DATASETS.items() for mode, n in spec["n_classes"].items()}


def test_a_deeply_nested_json_config_file_is_one_line(train_here, tmp_path):
    config = tmp_path / "deep.json"
    config.write_text(DEEP)
    line = one_line(train_here(tmp_path / "run", config=str(config)), 2)
    assert "deep.json nests lists or dicts too deeply" in line
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("text", [DEEP, "[" * 100 + "]" * 100])
def test_a_deeply_nested_override_of_a_list_key_is_one_line(capsys, tmp_path, text):
    registry = ConfigRegistry()
    registry.set_root({"sizes": [1, 2], "opts": {"k": 1}})
    for key in ("sizes", "opts"):
        value = text if key == "sizes" else '{"k": ' + text + "}"
        with pytest.raises(SystemExit) as exit_info:
            dispatch_with_overrides(lambda config, save_path: 0, registry, ["root", "unused", f"--{key}={value}"])
        result = subprocess.CompletedProcess([], exit_info.value.code, "", capsys.readouterr().err)
        assert f"--{key}" in one_line(result, 2)
    config = tmp_path / "nested.json"
    config.write_text('{"sizes": ' + "[" * 40 + "]" * 40 + "}")  # read fine, but json.dump would recurse too deep
    with pytest.raises(UsageError, match="nested more than 32 deep"):
        registry.get(str(config))


# ---------------------------------------------------------------- report.py on absurd run files


@pytest.fixture
def report_here(capsys):
    from src.scripts.report import main

    return in_process(main, capsys)


def test_report_skips_runs_with_absurd_numbers_and_sorts_mixed_columns(finished, tmp_path, report_here):
    results = tmp_path / "results"
    log = (finished / "log.jsonl").read_text().splitlines()[0]
    row = json.loads(log)

    def add(name, **files):
        shutil.copytree(finished, results / name)
        for file, text in files.items():
            (results / name / file).write_text(text)

    add("nan_and_inf", **{"log.jsonl": json.dumps({**row, "valid_acc": float("nan"), "train_loss": float("inf")})})
    add("huge_times", **{"log.jsonl": json.dumps({**row, "epoch_seconds": 1e308}) + "\n" +
                         json.dumps({**row, "epoch": 2, "epoch_seconds": 1e308})})
    add("string_acc", **{"log.jsonl": json.dumps({**row, "valid_acc": "high"})})
    add("huge_int", **{"log.jsonl": log.replace('"valid_acc": ', f'"valid_acc": {10**400}, "x": ')})
    add("status_nan", **{"status.json": '{"epochs_done": NaN, "finished": true}'})
    add("status_huge", **{"status.json": json.dumps({"epochs_done": 10**400})})
    add("deep_log", **{"log.jsonl": DEEP})
    add("deep_status", **{"status.json": DEEP})
    add("width_text", **{"config.json": edited_config(finished, dim_dense="wide")})  # a column of mixed types
    add("width_number", **{"config.json": edited_config(finished, dim_dense=5)})
    add("unknown_key", **{"config.json": edited_config(finished, note=5)})  # a key this code does not know
    result = report_here(results, "--sort", "dim_dense")
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    skipped = {line.split()[2].rstrip(":") for line in result.stderr.splitlines() if line.startswith("note: skipped")}
    assert skipped == {"string_acc", "huge_int", "status_nan", "status_huge", "deep_log", "deep_status", "unknown_key"}
    assert "a key this code no longer knows (note)" in result.stderr
    rows = [line.split()[0] for line in result.stdout.splitlines()[2:]]
    assert rows[0] == "width_number" and rows[-1] == "width_text" and set(rows[1:3]) == {"nan_and_inf", "huge_times"}
    assert "inf" in result.stdout.splitlines()[2 + rows.index("huge_times")]  # 2e308 seconds: inf hours
    backwards = report_here(results, "--sort", "dim_dense", "--reverse")
    assert [line.split()[0] for line in backwards.stdout.splitlines()[2:]][0] == "width_text"
    for column in ("best_valid_acc", "training_hours", "epochs", "state"):
        assert report_here(results, "--sort", column).returncode == 0


def test_sorting_puts_numbers_then_text_then_missing_values():
    import pandas as pd

    from src.scripts.report import sort_table

    table = pd.DataFrame({"run": list("abcdef"), "x": [3, "b", None, 1.5, float("nan"), "a"]})
    assert list(sort_table(table, "x")["run"]) == ["d", "a", "f", "b", "c", "e"]
    assert list(sort_table(table, "x", reverse=True)["run"]) == ["b", "f", "a", "d", "c", "e"]


# ---------------------------------------------------------------- sweeps


def sweep(data_dir, *args, wait=True, **extra_env):
    command = [sys.executable, str(SWEEP_SCRIPT), *map(str, args)]
    env = script_env(data_dir, **extra_env)
    if wait:
        return subprocess.run(command, cwd=REPO, capture_output=True, text=True, env=env, timeout=300)
    return subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)


def test_bad_sweeps_are_refused_before_anything_is_written(data_dir, tmp_path):
    grid = tmp_path / "grid"
    seeds = one_line(sweep(data_dir, "cifar10", grid, *TINY, "--seeds=-1"), 2)
    assert "--seeds must be at least 0" in seeds
    invalid = one_line(sweep(data_dir, "cifar10", grid, *TINY, "--n_filters=0,16", "--lr=0.1,-1"), 2)
    assert "3 of 4 grid points are invalid" in invalid
    assert "n_filters=0-lr=0.1: --n_filters must be at least 1" in invalid
    assert "n_filters=16-lr=-1.0: --lr must not be negative" in invalid
    # A PATH without Slurm's commands: os.defpath (/bin:/usr/bin) has them where Slurm is installed (CI).
    no_slurm = one_line(sweep(data_dir, "cifar10", grid, *TINY, "--backend=slurm", PATH=str(tmp_path / "nothing")), 1)
    assert "sbatch not found; " in no_slurm
    assert not grid.exists()


def test_a_failed_point_shows_the_runners_reason(finished, data_dir, tmp_path):
    from src.sweep import plan_sweep

    grid = tmp_path / "grid"
    arguments = [*TINY, "--lr=0.3"]
    [(folder, _, _)] = plan_sweep("cifar10", grid, dict(w[2:].split("=", 1) for w in arguments),
                                  simple_cnn_configs.root)
    shutil.copytree(finished, folder)  # a run made with lr=0.05: the runner refuses to mix them
    result = sweep(data_dir, "cifar10", grid, *arguments)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    failed = [line for line in result.stderr.splitlines() if line.startswith("failed: ")]
    assert len(failed) == 1 and "holds a run with a different config (lr: 0.05 -> 0.3)" in failed[0]


def test_the_job_reports_the_last_error_line_of_its_run(tmp_path):
    from src.sweep import RunFailed, TrainingJob, stderr_reason

    job = TrainingJob("cifar10", tmp_path / "run", [])
    job.command = lambda: [sys.executable, "-c", "import sys; print('error: an old one', file=sys.stderr); "
                           "print('error: the reason', file=sys.stderr); print('bye', file=sys.stderr); sys.exit(2)"]
    with pytest.raises(RunFailed, match="^the reason$"):
        job()
    job.command = lambda: [sys.executable, "-c", "import os; os.kill(os.getpid(), 15)"]
    with pytest.raises(RunFailed, match="^ended by SIGTERM; rerun the sweep to resume it$"):
        job()
    # What a job's stderr holds when the job itself raised: the sweep reads the reason from there.
    trace = ("submitit ERROR (2026-12-02 10:00:00) - Submitted job triggered an exception\nTraceback (most recent "
             "call last):\n  File \"x.py\", line 1\nsrc.sweep.RunFailed: the reason\n")
    stderr = tmp_path / "job.err"
    stderr.write_text(trace)
    assert stderr_reason(stderr) == "the reason"
    stderr.write_text(trace.replace("src.sweep.RunFailed", "MemoryError"))
    assert stderr_reason(stderr) == "MemoryError: the reason"


def test_huge_grids_are_refused_before_they_are_listed():
    from src.sweep import expand_grid

    with pytest.raises(UsageError, match="the grid would have 200000 points"):
        expand_grid({"lr": "0.1,0.2"}, simple_cnn_configs.root, seeds=10**5)  # checked before listing seeds
    with pytest.raises(UsageError, match="the grid would have 160000 points"):
        expand_grid({"lr": ",".join(["0.1"] * 400), "seed": ",".join(["1"] * 400)}, simple_cnn_configs.root)


def runners_of(folder):
    """Live processes whose command line names `folder` (the runs of a sweep there), read from /proc."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if str(TRAIN_SCRIPT) in command and str(folder) in command:
            found.append(int(pid))
    return found


def wait_for_checkpoints(process, folders, timeout=120):
    deadline = time.monotonic() + timeout
    while not all(list((f / "checkpoints").glob("checkpoint_*.pt")) if (f / "checkpoints").is_dir() else False
                  for f in folders):
        assert process.poll() is None and time.monotonic() < deadline, "the sweep ended before it was signalled"
        time.sleep(0.05)


@pytest.mark.parametrize(("target", "number"), [("sweep", signal.SIGTERM), ("process group", signal.SIGINT)])
def test_a_signalled_sweep_stops_its_runs_with_a_checkpoint_then_resumes(data_dir, tmp_path, target, number):
    """kill of the sweep alone, or a terminal's Ctrl-C (the whole process group): no run is left behind."""
    grid = tmp_path / "grid"
    args = ["cifar10", grid, *TINY, "--n_epochs=8", "--checkpoint_every_n_batches=4", "--n_filters=4,6",
            "--max_parallel=2"]
    process = sweep(data_dir, *args, wait=False)
    folders = [grid / "n_filters=4", grid / "n_filters=6"]
    wait_for_checkpoints(process, folders)
    (os.kill if target == "sweep" else os.killpg)(process.pid, number)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 128 + number, err
    assert "Traceback" not in err and f"stopped by {signal.Signals(number).name}: rerun" in err
    assert runners_of(grid) == []
    for folder in folders:
        assert "stopped at iteration" in (folder / "stderr.log").read_text()  # it checkpointed on the signal
        assert not json.loads((folder / "status.json").read_text())["finished"]
    if target == "sweep":  # the rerun finishes them
        rerun = sweep(data_dir, *args)
        assert rerun.returncode == 0, rerun.stderr
        for folder in folders:
            assert json.loads((folder / "status.json").read_text())["finished"]
            assert "resuming from" in (folder / "stdout.log").read_text()


# ---------------------------------------------------------------- Ctrl-C while the scripts import


@pytest.mark.parametrize("script", ["train", "evaluate", "report", "sweep"])
def test_ctrl_c_while_importing_exits_130_quietly(data_dir, tmp_path, script):
    """SIGINT at several instants of the start-up (imports take 0.1 to 1 s), counted from when the script has set
    its signals (before that, the interpreter itself is starting); a process already done is skipped."""
    arguments = {"train": [TRAIN_SCRIPT, "cifar10", tmp_path / "run", *TINY],
                 "evaluate": [EVALUATE_SCRIPT, tmp_path / "run"],
                 "report": [REPORT_SCRIPT, tmp_path],
                 "sweep": [SWEEP_SCRIPT, "cifar10", tmp_path / "grid", *TINY, "--n_epochs=1"]}[script]
    interrupted = 0
    for delay in (0.05, 0.1, 0.2, 0.3):
        process = subprocess.Popen([sys.executable, *map(str, arguments)], cwd=REPO, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True, env=script_env(data_dir))
        wait_until_catching(process, signal.SIGTERM)  # each script hands SIGINT and SIGTERM over at once
        time.sleep(delay)
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=60)
        assert "Traceback" not in err, (delay, err)
        if script in ("report", "sweep") and (process.returncode in (0, 2) or not err):
            continue  # done before the signal came (-2 and silent: it came as the interpreter shut down)
        assert process.returncode == 130, (delay, process.returncode, err)
        interrupted += 1
        if "started " not in out:  # a sweep that started a run stops it and says so, in a few lines
            assert err.count("\n") <= 1, err
    assert interrupted
    assert runners_of(tmp_path) == []


def test_report_writes_only_regular_files_or_standard_output(finished, tmp_path, report_here):
    """--csv/--markdown/--plot onto a FIFO, a symbolic link, a folder or a device node: refused in one line
    (exit 2) before anything is read, each left as it was; `-` streams the table to standard output."""
    results = tmp_path / "results"
    shutil.copytree(finished, results / "run")
    target = tmp_path / "target.csv"
    target.write_text("mine\n")
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "link").symlink_to(target)
    (tmp_path / "folder").mkdir()
    os.mknod(tmp_path / "null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))  # /dev/null's twin (the tests run as root)
    for name, kind in (("fifo", "a FIFO"), ("link", "a symbolic link"), ("folder", "a folder"), ("null", "a device")):
        for option in ("--csv", "--markdown", "--plot"):
            result = report_here(results, option, tmp_path / name)
            assert result.returncode == 2 and kind in result.stderr and result.stderr.count("\n") == 1, result
    assert stat.S_ISFIFO(os.lstat(tmp_path / "fifo").st_mode) and (tmp_path / "link").is_symlink()
    assert stat.S_ISCHR(os.lstat(tmp_path / "null").st_mode) and target.read_text() == "mine\n"
    streamed = report_here(results, "--csv", "-")
    assert streamed.returncode == 0 and "run," in streamed.stdout and "wrote" not in streamed.stdout
    assert report_here(results, "--plot", "-").returncode == 2
    assert report_here(results, "--csv", target).returncode == 0 and target.read_text().startswith("run")


def test_a_loaded_model_refuses_images_scaled_or_standardised_already(finished):
    """The models take pixel values 0..255: x / 255, [-1, 1] or standardised batches scored chance silently."""
    from src.analysis import load_main_loop

    ml = load_main_loop(finished)
    images = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = ml.model(images)
        assert torch.equal(ml.model(images.float()), expected)  # floats of the same values are fine
        for scaled in (images.float() / 255, images.float() / 127.5 - 1, (images.float() - 120) / 64):
            with pytest.raises(ValueError, match="pixel values 0..255"):
                ml.model(scaled)
    ml.model.train()  # training batches (float under mixup and cutout) are never checked: no host sync per step
    ml.model(images.float() / 255)
