"""Search hyperparameters with Optuna, pruning bad trials at epoch rungs; every trial is an ordinary run folder:

    python src/scripts/search.py CONFIG RESULTS_DIR/SEARCH_NAME --lr=log:0.01:0.5 --weight_decay=1e-4,5e-4 \\
        --n_filters=int:16:64 --n_trials=40 --pruner=asha [--backend=local|slurm ...] [--key=value ...]

The space: a,b,c a choice; lo:hi uniform (integers for an int key); int:lo:hi integers; log:lo:hi log-uniform;
any other --key=value is fixed for every trial. --sampler=tpe|random with --seed (the sampler's); --metric,
a validation column (valid_acc by default; losses are minimised); --pruner=asha|hyperband|median|none with
--min_epochs, the first rung. The study lives in SEARCH_DIR/search.db, or --storage=URL (any Optuna
storage: sqlite:///..., postgresql://..., or journal:PATH for a journal file on a shared file system).
Rerunning the same command continues the search: a trial killed or preempted resumes as the same trial.
Backends and their options as in sweep.py. The trials table and the best trial's command are printed at the
end (and by report.py SEARCH_DIR); history.png and params.png are drawn in the search folder.
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

SEARCH_OPTIONS = {
    "n_trials": (20, "trials in all, however many runs it takes to finish them"),
    "sampler": ("tpe", "tpe or random"),
    "seed": (0, "the sampler's seed (each trial's runs keep the config's own seed)"),
    "metric": ("valid_acc", "the validation column optimised: *_acc maximised, *_loss minimised"),
    "pruner": ("asha", "asha (successive halving), hyperband, median or none"),
    "min_epochs": (1, "the first rung: no trial is pruned before this epoch"),
    "storage": ("", "an Optuna storage URL; default sqlite:///SEARCH_DIR/search.db"),
    "study": ("search", "the study's name in the storage"),
}
METRICS = ("valid_acc", "valid_loss", "ema_valid_acc", "ema_valid_loss")


def parse(argv):
    from configs import find_config
    from src.extensions.search_trial import PRUNERS
    from src.sweep.options import BACKEND_OPTIONS, add_options, check_backend_options
    from src.sweep.search import SAMPLERS

    parser = OneLineErrorParser(description=__doc__, prog="search.py", allow_abbrev=False)
    parser.add_argument("config", help="a registered config name or a .json config")
    parser.add_argument("search_dir", help="RESULTS_DIR/SEARCH_NAME: the study and one run folder per trial go here")
    add_options(parser, {**SEARCH_OPTIONS, **BACKEND_OPTIONS})
    known, rest = parser.parse_known_args(argv)
    overrides = {}
    for word in rest:
        if not word.startswith("--") or "=" not in word:
            raise UsageError(f"unexpected '{word}': the space and fixed values are given as --key=value")
        key, text = word[2:].split("=", 1)
        overrides[key] = text
    check_backend_options(known, known.search_dir)
    for name, allowed in (("sampler", SAMPLERS), ("pruner", PRUNERS), ("metric", METRICS)):
        if getattr(known, name) not in allowed:
            raise UsageError(f"--{name} must be one of {', '.join(allowed)}, not '{getattr(known, name)}'")
    for name in ("n_trials", "min_epochs"):
        if getattr(known, name) < 1:
            raise UsageError(f"--{name} must be at least 1, not {getattr(known, name)}")
    if not known.study.strip():
        raise UsageError("--study is empty: give the study a name")
    family, base = find_config(known.config, overrides.get("model"))
    return known, overrides, family, base


def make_search(options, overrides, family, base):
    """The Search, every input checked: the space, each corner point, the metric against the config."""
    from src.sweep.search import Search
    from src.sweep.space import check_space, parse_space

    dimensions, fixed = parse_space(overrides, family.root)
    check_space(dimensions, fixed, base, family.problems)
    config = {**base, **fixed}
    problems = family.problems(config)
    if problems:
        raise UsageError(f"the fixed values are invalid: {'; '.join(problems)}")
    if config["valid_size"] <= 0:
        raise UsageError("a search ranks trials on the validation split: give --valid_size above 0 (the test set "
                         "is never used to choose)")
    if options.metric.startswith("ema_") and not config["ema"]:
        raise UsageError(f"--metric={options.metric} needs the EMA: fix --ema, or choose valid_acc")
    if options.min_epochs > config["n_epochs"]:
        raise UsageError(f"--min_epochs={options.min_epochs} is beyond n_epochs={config['n_epochs']}")
    search_dir = Path(options.search_dir)
    record = {"config": options.config, "family": family.model,
              "space": {d.key: d.text for d in dimensions}, "fixed": {k: overrides[k] for k in fixed},
              "metric": options.metric, "pruner": options.pruner, "min_epochs": options.min_epochs,
              "sampler": options.sampler, "seed": options.seed, "study": options.study,
              "storage": options.storage}  # empty: the search folder's own search.db
    return Search(search_dir, record, dimensions, fixed, base, family)


@exit_codes
def main(argv=None):
    from src.files import RunFolderLock

    options, overrides, family, base = parse(sys.argv[1:] if argv is None else argv)
    search = make_search(options, overrides, family, base)
    search.check_folder()
    if options.backend == "slurm":
        from src.sweep.slurm import check_slurm

        check_slurm()
    if options.storage:  # another place: opened before anything is written here
        search.open_study()
    search.search_dir.mkdir(parents=True, exist_ok=True)
    lock = RunFolderLock(search.search_dir, kind="search folder").acquire()
    try:
        search.save_record()  # first: a folder with it is this search's, whatever else a kill left there
        if not options.storage:
            search.open_study()
        stopped_by, left = launch(options, search)
        return summarize(search, stopped_by, left)
    finally:
        lock.release()


def trial_jobs(search, options):
    """The trials to run, drawn only as a place frees: first those a kill or a stop left running (resumed in
    their folders, as the same trials), then new ones until the study holds --n_trials."""
    from src.sweep import TrainingJob
    from src.sweep.search import trial_folder

    environment = {} if options.backend == "slurm" else {"CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES")}

    def job(number, arguments):
        linked = {**environment, "SEARCH_TRIAL": search.link(number).text()}
        return TrainingJob(search.record["config"], trial_folder(search.search_dir, number), arguments, linked,
                           search.family.runner)

    for number in search.unsettled():
        point = search.point_of(search.storage.get_trial(search.trial_id(number)))
        if point is not None:
            yield job(number, search.arguments(point))
        elif (prepared := search.prepare(number)) is not None:  # asked, then killed before its point was drawn
            yield job(*prepared)
    while len(search.trials()) < options.n_trials:
        prepared = search.prepare()
        if prepared is not None:
            yield job(*prepared)


def launch(options, search):
    """Run the trials -> (the stopping signal or None, the numbers of trials left running: stopped or killed)."""
    from src.data import load_dataset
    from src.sweep import local_gpu_groups, make_executor, run_local
    from src.sweep.search import trial_number

    left = set()

    def ended(job, error):
        number = trial_number(job.save_path)
        if search.settle(number, error):
            left.discard(number)
            search.say(f"trial {number}: {describe(search, number)}")
        else:
            left.add(number)

    def finished(path):
        return search.finished_or_pruned(trial_number(path))

    jobs = trial_jobs(search, options)
    if options.backend == "slurm":
        from src.sweep.slurm import run_slurm_stream, slurm_parameters

        parameters = slurm_parameters(search.search_dir.name, options.partition or None, options.time, options.gpus,
                                      options.cpus, options.mem, options.array_parallelism, options.signal_delay)
        executor = make_executor("slurm", search.search_dir, parameters)
        run_slurm_stream(jobs, executor, search.search_dir, search.search_dir.name, finished,
                         options.array_parallelism, ended)
        return None, left
    config = {**search.base, **search.fixed}
    load_dataset(config["dataset"], label_mode=config["label_mode"])  # decoded once, not in every trial at once
    groups = local_gpu_groups(options)
    _, stopped_by = run_local(jobs, make_executor("local", search.search_dir, {}), options.max_parallel or 1,
                              finished, gpu_groups=groups, ended=ended)
    return stopped_by, left


def describe(search, number):
    trial = search.storage.get_trial(search.trial_id(number))
    shown = f" {search.record['metric']} {trial.value:.4f}" if trial.value is not None else ""
    return f"{trial.state.name.lower()}{shown}" + (f" ({trial.user_attrs['error']})" if "error" in trial.user_attrs
                                                  else "")


def summarize(search, stopped_by, left):
    """The trials table, the best trial's command and the figures -> the exit code: 128 + N after signal N,
    1 when a trial was left stopped or killed (rerun to resume it), else 0."""
    from src.sweep import signal_name
    from src.sweep.report import best_command, draw_search, trials_table

    table = trials_table(search)
    print(table.to_string(index=False) if not table.empty else "no trials yet")
    best = best_command(search)
    if best:
        print(best)
    draw_search(search, table)
    if stopped_by:
        print(f"stopped by {signal_name(stopped_by)}: rerun the same command to resume the search", file=sys.stderr)
        return 128 + stopped_by
    if left:
        print(f"trials {', '.join(map(str, sorted(left)))} did not finish (stopped or killed): rerun the same "
              "command to resume them", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    main()
