"""Seed groups: `group_seeds(load_runs(...))`, one row per configuration without its seed, with the mean and
standard deviation of every metric over its seeds.
"""
import json

from src.analysis.runs import RUN_METRICS, is_test_metric
from src.runs.folder import RESUMABLE_CHANGES

# What `group_seeds` adds beside the config keys; every metric becomes `<metric>_mean` and `<metric>_std`.
GROUP_COUNTS = ("n", "finished", "evaluated", "seeds", "runs", "parameters", "macs_per_image")
GROUPED_METRICS = ("best_valid_acc", "last_valid_acc", "training_hours")
# Keys that decide only when to checkpoint and what to log, not what is computed: seeds differing in them
# are still one configuration (and the grouped table leaves them out).
NOT_CONFIGURATION = tuple(key for key in RESUMABLE_CHANGES if key != "n_epochs")


def group_seeds(runs):
    """`load_runs`' table with one row per configuration without its seed, in the order of its first run:
    the config keys (but those that decide only when to checkpoint and whether to write TensorBoard
    events), `n` (runs), `finished`, `evaluated` (runs with test results), `seeds`, `runs`, the model's
    `parameters` and `macs_per_image`, and the mean and standard deviation (n - 1 in the denominator; NaN
    for a single run) of the best and last validation accuracy, of every number evaluate.py saved, and of
    the training hours, each over the runs that have it."""
    import pandas as pd

    if runs.empty:
        return pd.DataFrame()
    tests = sorted(c for c in runs.columns if is_test_metric(c))
    keys = [c for c in runs.columns if c not in ("run", "seed", *RUN_METRICS, *NOT_CONFIGURATION) and c not in tests]
    groups = {}
    for position, values in enumerate(runs[keys].itertuples(index=False)):
        groups.setdefault(tuple(json.dumps(_plain(v), sort_keys=True) for v in values), []).append(position)
    rows = []
    for positions in groups.values():
        members = runs.iloc[positions]
        row = dict(zip(keys, members[keys].iloc[0], strict=True))
        row.update(n=len(members), finished=int((members["state"] == "finished").sum()),
                   evaluated=int(members[tests].notna().any(axis=1).sum()) if tests else 0,
                   seeds=list(members["seed"]) if "seed" in members else [], runs=list(members["run"]),
                   parameters=_first(members["parameters"]), macs_per_image=_first(members["macs_per_image"]))
        for metric in (*GROUPED_METRICS[:2], *tests, GROUPED_METRICS[2]):
            present = members[metric].dropna().astype(float)
            row[f"{metric}_mean"] = present.mean() if len(present) else None
            row[f"{metric}_std"] = present.std(ddof=1) if len(present) > 1 else None
        rows.append(row)
    return pd.DataFrame(rows)


def _plain(value):
    """A config value as JSON can hold it: pandas fills a key a run's config lacks with NaN."""
    if isinstance(value, float) and value != value:
        return None
    return value.item() if hasattr(value, "item") and not isinstance(value, (list, dict)) else value


def _first(column):
    present = column.dropna()
    return int(present.iloc[0]) if len(present) else None
