"""A sweep's plan: a grid of `--key=value` overrides -> one run folder per point, and whether a point's run
already finished with exactly its config.
"""
import itertools
import json
import math
from pathlib import Path

from src.analysis import read_config, read_object
from src.config import check_known_key, parse_value
from src.errors import UsageError
from src.runs.folder import is_finished as finished
from src.runs.names import STATUS

PLAN = "sweep.json"
MAX_POINTS = 10000  # a sweep folder of more runs than this is a typo, not an experiment


def split_values(key, text, root):
    """`--key=a,b,c` -> [a, b, c] typed by the root; a JSON list or dict value is one value."""
    check_known_key(key, root)
    parts = [text] if text.lstrip().startswith(("[", "{")) else text.split(",")
    return [parse_value(key, part.strip(), root) for part in parts]


def expand_grid(overrides, root, seeds=0):
    """{key: text} -> [{key: value, ...}] for every combination; `seeds` > 0 adds seed = 1..seeds."""
    axes = {key: split_values(key, text, root) for key, text in overrides.items()}
    if seeds:
        if "seed" in axes:
            raise UsageError("give either --seeds=N or --seed=..., not both")
        size = math.prod(len(values) for values in axes.values()) * seeds
        if size > MAX_POINTS:  # checked before the seeds are listed: --seeds=10**9 would fill the memory
            raise UsageError(f"the grid would have {size} points; at most {MAX_POINTS} (a typo in --seeds?)")
        axes["seed"] = list(range(1, seeds + 1))
    size = math.prod(len(values) for values in axes.values())
    if size > MAX_POINTS:
        raise UsageError(f"the grid would have {size} points; at most {MAX_POINTS}: split it into several sweeps")
    keys = list(axes)
    return [dict(zip(keys, values, strict=True)) for values in itertools.product(*(axes[k] for k in keys))]


def point_name(point, varying):
    """Folder name from the keys that vary across the grid, e.g. `n_filters=8-lr=0.1`."""
    shown = [key for key in point if key in varying] or list(point)
    return "-".join(f"{key}={_text(point[key])}" for key in shown) or "run"


def _text(value):
    if isinstance(value, bool):
        return "true" if value else "false"
    return json.dumps(value, separators=(",", ":")) if isinstance(value, (list, dict)) else str(value)


def plan_sweep(config, sweep_dir, overrides, root, seeds=0, base=None):
    """-> [(run folder, [--key=value, ...], resolved config)] for every point of the grid; `base`
    is the named config the overrides apply to (default: the root)."""
    grid = expand_grid(overrides, root, seeds)
    varying = {key for key in grid[0] if len({_text(point[key]) for point in grid}) > 1}
    runs = []
    for point in grid:
        arguments = [f"--{key}={_text(value)}" for key, value in point.items()]
        runs.append((Path(sweep_dir) / point_name(point, varying), arguments, {**(base or root), **point}))
    names = [path.name for path, _, _ in runs]
    if len(set(names)) != len(names):
        raise UsageError("two grid points would share a folder: give each value only once")
    return runs


def is_finished(run_dir, expected_config):
    """Finished with exactly this config (an older config.json completed with the keys added since, as a
    resume would); anything else (a raised n_epochs, a changed key) goes to the runner, which trains
    further, resumes, or refuses with the reason."""
    try:
        status = read_object(Path(run_dir) / STATUS)
        saved = read_config(run_dir)
    except (OSError, ValueError):  # missing or unreadable (src.analysis.UnreadableRun): the runner says which
        return False
    return finished(status, saved["n_epochs"]) and saved == expected_config
