"""Run a grid of overrides, one run folder per point:

    python src/scripts/sweep.py CONFIG RESULTS_DIR/SWEEP_NAME --n_filters=8,16,32 --lr=0.1,0.05 [--seeds=3]

--backend=local (default) runs --max_parallel points at a time on this machine (with --gpus_per_job=K,
one per free group of K GPUs); --backend=slurm submits a Slurm job array (--partition, --time minutes,
--gpus, --cpus, --mem GB, --array_parallelism, --signal_delay seconds) and does not submit again the
points Slurm still has queued or running. Rerunning the same sweep skips finished points and resumes
the others.
The run table is printed at the end.
"""
import os
import sys
from pathlib import Path

REPO = str(Path(__file__).resolve().parents[2])
sys.path.insert(0, REPO)  # run from anywhere, no PYTHONPATH

from src.signals import exit_at_once_on  # noqa: E402  (os and signal only: in place before the slow imports)

if __name__ == "__main__":
    exit_at_once_on("SIGINT", "SIGTERM")

os.environ.setdefault("PYTORCH_JIT", "0")  # as train_simple_CNN.py does
# submitit's job processes unpickle src.sweep.TrainingJob: they need the repository on their path too.
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")]))

from src.cli import OneLineErrorParser, exit_codes  # noqa: E402
from src.errors import UsageError  # noqa: E402
from src.sweep.options import BACKEND_OPTIONS, add_options, check_backend_options  # noqa: E402

def parse(argv):
    from configs import find_config

    parser = OneLineErrorParser(description=__doc__, prog="sweep.py", allow_abbrev=False)
    parser.add_argument("config", help="a registered config name or a .json config")
    parser.add_argument("sweep_dir", help="RESULTS_DIR/SWEEP_NAME: one run folder per point goes here")
    add_options(parser, {**BACKEND_OPTIONS, "seeds": (0, "add seed = 1..N to the grid")})
    parser.add_argument("--dry_run", action="store_true", help="print the runs and exit")
    known, rest = parser.parse_known_args(argv)
    overrides = {}
    for word in rest:
        if not word.startswith("--") or "=" not in word:
            raise UsageError(f"unexpected '{word}': config values are given as --key=value1,value2")
        key, text = word[2:].split("=", 1)
        overrides[key] = text
    check_backend_options(known, known.sweep_dir)
    if known.seeds < 0:
        raise UsageError(f"--seeds must be at least 0, not {known.seeds}")
    # An unknown config name fails here, before anything runs; `--model=NAME` picks the family where
    # two families name a config alike.
    family, base = find_config(known.config, overrides.get("model"))
    return known, overrides, family, base


def check_points(runs, family):
    """Every point as the runner would check it, before anything is written or submitted: one bad value
    must not leave a half-started grid behind."""
    bad = [f"{path.name}: {'; '.join(problems)}" for path, _, config in runs if (problems := family.problems(config))]
    if bad:
        raise UsageError(f"{len(bad)} of {len(runs)} grid points are invalid: {' | '.join(bad)}")


@exit_codes
def main(argv=None):
    from src.files import write_json
    from src.sweep import PLAN, is_finished, plan_sweep

    options, overrides, family, base = parse(sys.argv[1:] if argv is None else argv)
    sweep_dir = Path(options.sweep_dir)
    runs = plan_sweep(options.config, sweep_dir, overrides, family.root, options.seeds, base)
    check_points(runs, family)
    for path, arguments, config in runs:
        print(f"{'finished' if is_finished(path, config) else 'to run  '}  {path}  {' '.join(arguments)}")
    if options.dry_run:
        return 0
    if options.backend == "slurm":
        from src.sweep.slurm import check_slurm

        check_slurm()
    from src.sweep import local_gpu_groups

    groups = local_gpu_groups(options) if options.backend == "local" else []
    sweep_dir.mkdir(parents=True, exist_ok=True)
    write_json(sweep_dir / PLAN, {"config": options.config, "overrides": overrides, "seeds": options.seeds,
                                  "runs": {str(path.name): arguments for path, arguments, _ in runs}})
    to_run = [(path, arguments, config) for path, arguments, config in runs if not is_finished(path, config)]
    outcome, stopped_by = launch(options, sweep_dir, to_run, family, groups) if to_run else ({}, None)
    return summarize(sweep_dir, outcome, stopped_by, grouped=bool(options.seeds) or "seed" in overrides)


def launch(options, sweep_dir, runs, family, groups):
    """Run the unfinished points -> ({run folder: None or the failure's one line}, the stopping signal or None)."""
    from src.data import load_dataset
    from src.sweep import TrainingJob, is_finished, make_executor, run_local
    from src.sweep.slurm import run_slurm, slurm_parameters

    expected = {str(path): config for path, _, config in runs}

    def finished(path):  # a point succeeded when its run folder says finished, with the config asked for
        return is_finished(path, expected[str(path)])

    if options.backend == "slurm":  # Slurm gives each job its GPUs
        jobs = [TrainingJob(options.config, path, arguments, {}, family.runner) for path, arguments, _ in runs]
        parameters = slurm_parameters(sweep_dir.name, options.partition or None, options.time, options.gpus,
                                      options.cpus, options.mem, options.array_parallelism, options.signal_delay)
        executor = make_executor("slurm", sweep_dir, parameters)
        return run_slurm(jobs, executor, sweep_dir, sweep_dir.name, finished), None
    # Local jobs see the GPUs the sweep sees (submitit would hide them), or their group's.
    environment = {"CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES")}
    jobs = [TrainingJob(options.config, path, arguments, environment, family.runner) for path, arguments, _ in runs]
    for dataset, label_mode in {(config["dataset"], config["label_mode"]) for _, _, config in runs}:
        load_dataset(dataset, label_mode=label_mode)  # decode (or download) the data once, not in every job at once
    return run_local(jobs, make_executor("local", sweep_dir, {}), options.max_parallel or 1, finished,
                     gpu_groups=groups)


def summarize(sweep_dir, outcome, stopped_by, grouped=False):
    """Print the run table (then, when the grid has seeds, the same runs with seeds aggregated) and each
    failure's reason -> the exit code: 128 + N after signal N, 1 if a point failed."""
    from src.analysis import load_runs
    from src.analysis.table import as_text, build_table, grouped_text
    from src.sweep import signal_name

    table = load_runs(sweep_dir)
    if not table.empty:
        print(as_text(build_table(table)), end="")
        if grouped:
            print("\nseeds aggregated (mean ± std over each configuration's runs; report.py --group-seeds):")
            print(grouped_text(table), end="")
    failed = {path: error for path, error in outcome.items() if error}
    for path, error in failed.items():
        print(f"failed: {path}: {error}", file=sys.stderr)
    if stopped_by:
        print(f"stopped by {signal_name(stopped_by)}: rerun the same command to resume the sweep", file=sys.stderr)
        return 128 + stopped_by
    return 1 if failed else 0


if __name__ == "__main__":
    main()
