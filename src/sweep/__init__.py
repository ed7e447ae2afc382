"""Sweeps and searches: grids of runs, and Optuna searches whose trials are runs. Every point is the ordinary
runner (`train_<family>.py CONFIG SAVE_PATH --key=value ...`) in a subprocess of a submitit job, so a sweep's
run behaves exactly like a run started by hand: rerunning the sweep skips finished points and resumes the
others. On Slurm's time-out or preemption warning (SIGUSR2, `signal_delay_s` before the end), submitit calls
the job's `checkpoint()`: it passes the signal on to the runner, which checkpoints and exits, and submitit
requeues the job, which then resumes.

    plan.py    the grid -> run folders, and "finished with this config"
    jobs.py    TrainingJob (what submitit runs; jobs queued on Slurm unpickle it as src.sweep.TrainingJob),
               and how a job's end reads
    local.py   running jobs here; slurm.py: job arrays, squeue, points still queued
    options.py the backends' options, shared by sweep.py and search.py
    space.py   a search's space from the command line; search.py its study and trials; report.py its table
               and figures (a trial's run reports to the study itself: src.extensions.search_trial)

May import: src.analysis and everything below it. Imported by: src.scripts.
"""
from src.sweep.jobs import RUN_FAILED, RunFailed, TrainingJob, point_outcome, signal_name, stderr_reason  # noqa: F401
from src.sweep.local import gpu_groups, local_gpu_groups, make_executor, run_local, visible_gpus  # noqa: F401
from src.sweep.plan import PLAN, expand_grid, is_finished, plan_sweep, point_name  # noqa: F401
from src.sweep.slurm import check_slurm, run_slurm, slurm_parameters  # noqa: F401
