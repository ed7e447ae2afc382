"""Run a grid of overrides, one run folder per point:

    python src/scripts/sweep.py CONFIG RESULTS_DIR/SWEEP_NAME --n_filters=8,16,32 --lr=0.1,0.05 [--seeds=3]

--backend=local (default) runs --max_parallel points at a time on this machine; --backend=slurm
submits a Slurm job array (--partition, --time minutes, --gpus, --cpus, --mem GB,
--array_parallelism). Rerunning the same sweep skips finished points and resumes the others.
The run table is printed at the end.
"""
import os
import sys
from pathlib import Path

REPO = str(Path(__file__).resolve().parents[2])
sys.path.insert(0, REPO)  # run from anywhere, no PYTHONPATH

from src.signals import exit_at_once_on  # noqa: E402  (os and signal only: in place before the slow imports)

if __name__ == "__main__":
    exit_at_once_on("SIGINT")

os.environ.setdefault("PYTORCH_JIT", "0")  # as train_simple_CNN.py does
# submitit's job processes unpickle src.sweep.TrainingJob: they need the repository on their path too.
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")]))

from src.cli import OneLineErrorParser, exit_codes  # noqa: E402
from src.errors import RunError, UsageError  # noqa: E402

SWEEP_OPTIONS = {
    "backend": ("local", "local (on this machine) or slurm"),
    "max_parallel": (1, "local: runs at a time"),
    "seeds": (0, "add seed = 1..N to the grid"),
    "partition": ("", "slurm: partition"),
    "time": (60, "slurm: minutes per job before it is requeued"),
    "gpus": (0, "slurm: GPUs per job"),
    "cpus": (4, "slurm: CPUs per job"),
    "mem": (16, "slurm: memory per job, GB"),
    "array_parallelism": (8, "slurm: jobs of the array running at once"),
}


def parse(argv):
    from src.config import find_config

    parser = OneLineErrorParser(description=__doc__, prog="sweep.py", allow_abbrev=False)
    parser.add_argument("config", help="a registered config name or a .json config")
    parser.add_argument("sweep_dir", help="RESULTS_DIR/SWEEP_NAME: one run folder per point goes here")
    for name, (default, text) in SWEEP_OPTIONS.items():
        parser.add_argument(f"--{name}", type=type(default), default=default, help=f"{text} (default: {default})")
    parser.add_argument("--dry_run", action="store_true", help="print the runs and exit")
    known, rest = parser.parse_known_args(argv)
    overrides = {}
    for word in rest:
        if not word.startswith("--") or "=" not in word:
            raise UsageError(f"unexpected '{word}': config values are given as --key=value1,value2")
        key, text = word[2:].split("=", 1)
        overrides[key] = text
    if known.backend not in ("local", "slurm"):
        raise UsageError(f"--backend must be local or slurm, not '{known.backend}'")
    for name, least in (("max_parallel", 1), ("seeds", 0), ("time", 1), ("gpus", 0), ("cpus", 1), ("mem", 1),
                        ("array_parallelism", 1)):
        if getattr(known, name) < least:
            raise UsageError(f"--{name} must be at least {least}, not {getattr(known, name)}")
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


def check_slurm():
    """submitit would fail with a traceback on a machine without Slurm; say it in one line instead."""
    import shutil

    missing = [command for command in ("sbatch", "srun") if shutil.which(command) is None]
    if missing:
        raise RunError(f"{missing[0]} not found; --backend=slurm runs where Slurm's commands are on PATH (a "
                       "cluster's login node); here, use --backend=local")


@exit_codes
def main(argv=None):
    from src.files import write_json
    from src.sweep import (PLAN, TrainingJob, is_finished, make_executor, plan_sweep, run_local, run_slurm,
                           slurm_parameters)

    options, overrides, family, base = parse(sys.argv[1:] if argv is None else argv)
    sweep_dir = Path(options.sweep_dir)
    runs = plan_sweep(options.config, sweep_dir, overrides, family.root, options.seeds, base)
    check_points(runs, family)
    for path, arguments, config in runs:
        print(f"{'finished' if is_finished(path, config) else 'to run  '}  {path}  {' '.join(arguments)}")
    if options.dry_run:
        return 0
    if options.backend == "slurm":
        check_slurm()
    sweep_dir.mkdir(parents=True, exist_ok=True)
    write_json(sweep_dir / PLAN, {"config": options.config, "overrides": overrides, "seeds": options.seeds,
                                  "runs": {str(path.name): arguments for path, arguments, _ in runs}})
    # Local jobs see the GPUs the sweep sees (submitit would hide them); Slurm sets them per job.
    environment = {} if options.backend == "slurm" else {"CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES")}
    to_run = [TrainingJob(options.config, path, arguments, environment, family.runner)
              for path, arguments, config in runs if not is_finished(path, config)]
    if to_run and options.backend == "local":  # decode (or download) the data once, not in every job at once
        from src.data import load_dataset

        for dataset, label_mode in {(config["dataset"], config["label_mode"]) for _, _, config in runs}:
            load_dataset(dataset, label_mode=label_mode)
    outcome, stopped_by = {}, None
    if to_run:
        parameters = slurm_parameters(sweep_dir.name, options.partition or None, options.time, options.gpus,
                                      options.cpus, options.mem, options.array_parallelism)
        executor = make_executor(options.backend, sweep_dir, parameters)
        if options.backend == "slurm":
            outcome = run_slurm(to_run, executor)
        else:
            outcome, stopped_by = run_local(to_run, executor, options.max_parallel)
    return summarize(sweep_dir, outcome, stopped_by)


def summarize(sweep_dir, outcome, stopped_by):
    """Print the run table and each failure's reason -> the exit code: 128 + N after signal N, 1 if a point failed."""
    from src.analysis import load_runs
    from src.run_table import as_text, build_table
    from src.sweep import signal_name

    table = load_runs(sweep_dir)
    if not table.empty:
        print(as_text(build_table(table)), end="")
    failed = {path: error for path, error in outcome.items() if error}
    for path, error in failed.items():
        print(f"failed: {path}: {error}", file=sys.stderr)
    if stopped_by:
        print(f"stopped by {signal_name(stopped_by)}: rerun the same command to resume the sweep", file=sys.stderr)
        return 128 + stopped_by
    return 1 if failed else 0


if __name__ == "__main__":
    main()
