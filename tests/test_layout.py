"""The shape of the tree: the import graph's layers and no cycle (import-linter's contracts in pyproject.toml),
the top of src/, the README and docs/ true to the tree, and a model family added as docs/extending.md says."""
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, run_script

LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"
# The spec's modules and the plumbing every reader needs first; everything else lives in a package.
TOP_OF_SRC = {"__init__.py", "config.py", "data.py", "models.py", "main_loop.py", "evaluation.py", "cli.py",
              "errors.py", "files.py", "signals.py", "runner.py"}
PACKAGES = {"datasets", "networks", "training", "extensions", "runs", "analysis", "sweep", "bench", "scripts"}
DOCS = sorted((REPO / "docs").glob("*.md"))
# What the worked example of docs/extending.md creates: named there, absent from the tree.
WORKED_EXAMPLE = {"src/networks/mlp.py", "configs/mlp.py", "src/scripts/train_mlp.py"}


def lint_imports(root):
    return subprocess.run([str(LINT_IMPORTS)], cwd=root, capture_output=True, text=True, timeout=300)


def copy_code(to):
    """src/, configs/ and pyproject.toml in a folder of their own, to change without touching the checkout."""
    for name in ("src", "configs"):
        shutil.copytree(REPO / name, to / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", to)
    return to


def test_the_import_graph_keeps_its_layers_and_has_no_cycle():
    result = lint_imports(REPO)
    assert result.returncode == 0, result.stdout[-3000:]
    assert "2 kept, 0 broken" in result.stdout


@pytest.mark.parametrize("where, line, broken", [
    ("src/sweep/jobs.py", "def _probe():\n    from src.sweep import slurm  # noqa\n", "No import cycles"),
    ("src/networks/bricks.py", "def _probe():\n    from src.main_loop import MainLoop  # noqa\n", "Layers"),
    ("src/config.py", "def _probe():\n    import configs  # noqa\n", "Layers"),
])
def test_a_lazy_import_up_a_layer_or_round_a_circle_breaks_the_contracts(tmp_path, where, line, broken):
    root = copy_code(tmp_path)
    with open(root / where, "a") as f:
        f.write("\n\n" + line)
    result = lint_imports(root)
    assert result.returncode != 0 and f"{broken}" in result.stdout and "BROKEN" in result.stdout, result.stdout


def test_the_top_of_src_holds_the_spec_modules_and_the_plumbing_alone():
    files = {p.name for p in (REPO / "src").iterdir() if p.is_file() and p.suffix == ".py"}
    folders = {p.name for p in (REPO / "src").iterdir() if p.is_dir() and p.name != "__pycache__"}
    assert files == TOP_OF_SRC
    assert folders == PACKAGES


def test_every_package_says_what_it_holds_and_its_init_only_imports():
    import ast

    for package in PACKAGES - {"scripts"}:
        tree = ast.parse((REPO / "src" / package / "__init__.py").read_text())
        assert ast.get_docstring(tree), package
        assert all(isinstance(node, (ast.Import, ast.ImportFrom)) for node in tree.body[1:]), package


def test_the_readme_is_short_and_links_every_docs_page():
    readme = (REPO / "README.md").read_text()
    assert len(readme.splitlines()) < 200
    assert DOCS, "docs/ has no page"
    for page in DOCS:
        assert f"docs/{page.name}" in readme, f"README.md does not link {page.name}"


def named_paths(text):
    """Every repository path a text names (src/..., configs/..., docs/..., etc/..., tests/...)."""
    found = re.findall(r"(?<![\w./-])((?:src|configs|docs|etc|tests)/[\w./-]*[\w/])", text)
    return {path.rstrip("/") for path in found if "*" not in path and "<" not in path}


@pytest.mark.parametrize("page", [REPO / "README.md", *DOCS], ids=lambda p: p.name)
def test_every_path_and_make_target_a_page_names_exists(page):
    text = page.read_text()
    missing = sorted(p for p in named_paths(text) if not (REPO / p).exists() and p not in WORKED_EXAMPLE)
    assert not missing, f"{page.name} names {missing}"
    makefile = (REPO / "Makefile").read_text()
    targets = set(re.findall(r"^([\w-]+):", makefile, flags=re.M))
    targets |= {t for line in re.findall(r"^[A-Z_]+ := (.*)$", makefile, flags=re.M) for t in line.split()}
    named = set(re.findall(r"`make ([\w-]+)", text)) | set(re.findall(r"^make ([\w-]+)", text, flags=re.M))
    assert not named - targets, f"{page.name} names make targets the Makefile lacks: {sorted(named - targets)}"


def test_a_page_that_names_a_missing_path_fails_the_check():
    assert "src/nowhere.py" in named_paths("see `src/nowhere.py` and src/data.py.")
    assert "src/data.py" in named_paths("see src/data.py.")


def worked_example():
    """{path: code} of docs/extending.md's worked example: each python block after the line naming its file."""
    text = (REPO / "docs" / "extending.md").read_text()
    blocks = {}
    for path in ("src/networks/mlp.py", "configs/mlp.py"):
        match = re.search(re.escape(f"`{path}`") + r"(?:(?!```).)*?```python\n(.*?)```", text, flags=re.S)
        assert match, f"docs/extending.md has no code for {path}"
        blocks[path] = match.group(1)
    line = re.search(r"```python\n(from configs import mlp[^\n]*)\n```", text)
    assert line and 'main("mlp", __doc__)' in text
    return blocks, line.group(1)


@pytest.mark.slow
def test_a_family_added_as_docs_extending_says_trains_resumes_and_is_read_back(tmp_path, data_dir):
    """One networks module, one config module, one runner and one line in configs/__init__.py, as the docs
    give them, in a copy of the code: the run trains and resumes, the tools read it, the layers still hold."""
    root = copy_code(tmp_path / "code")
    blocks, line = worked_example()
    for path, code in blocks.items():
        (root / path).write_text(code)
    runner = (REPO / "src/scripts/train_simple_CNN.py").read_text()
    assert runner.count('main("simple_cnn", __doc__)') == 1
    runner = runner.replace('main("simple_cnn", __doc__)', 'main("mlp", __doc__)')
    (root / "src/scripts/train_mlp.py").write_text(runner)
    with open(root / "configs/__init__.py", "a") as f:
        f.write(line + "\n")
    run = tmp_path / "run"
    args = ["mlp_cifar10", run, "--width=8", "--batch_size=50", "--valid_size=100", "--checkpoint_every_seconds=0",
            "--tensorboard=false"]
    first = run_script(root / "src/scripts/train_mlp.py", *args, "--n_epochs=1", data_dir=data_dir, cwd=root)
    assert first.returncode == 0, first.stderr
    second = run_script(root / "src/scripts/train_mlp.py", *args, "--n_epochs=2", data_dir=data_dir, cwd=root)
    assert second.returncode == 0 and "resuming from" in second.stdout, second.stderr
    read = subprocess.run([sys.executable, "-c", "import sys; from src.analysis import load_main_loop, load_runs; "
                           "m = load_main_loop(sys.argv[1]); t = load_runs(sys.argv[2]); "
                           "print(m.config['model'], type(m.model[2]).__name__, len(m.log), m.status['finished'], "
                           "t['state'][0])", str(run), str(tmp_path)],
                          cwd=root, capture_output=True, text=True, timeout=120)
    assert read.returncode == 0 and read.stdout.split() == ["mlp", "Linear", "2", "True", "finished"], read.stderr
    assert lint_imports(root).returncode == 0


def test_a_sweep_job_pickled_before_the_move_unpickles_to_today_s_class():
    """submitit unpickles a job queued on Slurm by the module path it was pickled under: src.sweep.TrainingJob."""
    import pickle

    from src.sweep import TrainingJob

    job = TrainingJob("cifar10", "results/x", ["--lr=0.1"])
    old = pickle.dumps(job, protocol=0).replace(b"csrc.sweep.jobs\nTrainingJob\n", b"csrc.sweep\nTrainingJob\n")
    assert b"src.sweep.jobs" not in old
    loaded = pickle.loads(old)
    assert type(loaded) is TrainingJob and loaded.command()[2:] == ["cifar10", "results/x", "--lr=0.1"]


def test_what_notebooks_import_stays_where_it_was():
    """The names notebooks and etc/analysis_example.py import, from the modules they imported them from."""
    from src.analysis import (  # noqa: F401
        UnreadableRun, group_seeds, load_main_loop, load_runs, read_config, read_log, summarize_run,
    )
    from src.data import (  # noqa: F401
        CIFAR10_CLASSES, DATASETS, Dataset, channel_mean_std, get_cifar, load_cifar, register_dataset,
        split_train_valid,
    )
    from src.models import MODELS, Standardize, build_model, build_simple_cnn, find_standardize  # noqa: F401

    assert {"simple_cnn", "resnet", "wrn", "preact_resnet", "vgg", "fast"} <= set(MODELS)
