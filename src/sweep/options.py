"""The options that say where a sweep's or a search's runs go (this machine or Slurm), shared by sweep.py and
search.py, and their checks."""
from src.errors import UsageError

BACKEND_OPTIONS = {
    "backend": ("local", "local (on this machine) or slurm"),
    "max_parallel": (0, "local: runs at a time; 0: 1, or one per GPU group with --gpus_per_job"),
    "gpus_per_job": (0, "local: GPUs of each job (its own CUDA_VISIBLE_DEVICES; the run trains on the first); "
                        "0: every job sees all"),
    "partition": ("", "slurm: partition"),
    "time": (60, "slurm: minutes per job before it is requeued"),
    "gpus": (0, "slurm: GPUs per job"),
    "cpus": (4, "slurm: CPUs per job"),
    "mem": (16, "slurm: memory per job, GB"),
    "array_parallelism": (8, "slurm: jobs running at once"),
    "signal_delay": (120, "slurm: seconds before the time limit at which a job is warned to checkpoint"),
}
LEAST = {"max_parallel": 0, "gpus_per_job": 0, "time": 1, "gpus": 0, "cpus": 1, "mem": 1, "array_parallelism": 1,
         "signal_delay": 1}


def add_options(parser, options):
    for name, (default, text) in options.items():
        parser.add_argument(f"--{name}", type=type(default), default=default, help=f"{text} (default: {default})")


def check_backend_options(known, folder):
    """One line (UsageError) for a backend option out of range or one that the backend would ignore."""
    if "%" in folder:  # submitit expands %j, %t, %A, %a... in its folder: the jobs' files would go astray
        raise UsageError(f"the folder '{folder}' holds a '%', which submitit reads as a job placeholder; "
                         "choose a name without it")
    if known.backend not in ("local", "slurm"):
        raise UsageError(f"--backend must be local or slurm, not '{known.backend}'")
    for name, least in LEAST.items():
        if getattr(known, name) < least:
            raise UsageError(f"--{name} must be at least {least}, not {getattr(known, name)}")
    if known.backend == "slurm" and known.gpus_per_job:  # it would be ignored: a job asked for no GPU at all
        raise UsageError(f"--gpus_per_job={known.gpus_per_job} is for --backend=local; with --backend=slurm, "
                         f"give each job its GPUs with --gpus={known.gpus_per_job}")
    if known.backend == "slurm" and known.signal_delay >= 60 * known.time:
        raise UsageError(f"--signal_delay={known.signal_delay} s is not shorter than --time={known.time} min: "
                         "every job would be warned as it starts")
