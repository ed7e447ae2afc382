# %% [markdown]
# # Comparing runs
# Cells for Jupyter/VS Code (`# %%`), or run it whole:
# `python etc/analysis_example.py RESULTS_DIR [OUT.png]` (defaults: $RESULTS_DIR, results/comparison.png).
# It reads run folders only: no training, no test set.

# %%
import os
import sys
from pathlib import Path

as_script = "__file__" in globals()  # in a notebook, start it from the repository root instead
sys.path.insert(0, str(Path(__file__).resolve().parents[1]) if as_script else os.getcwd())

from src.analysis import group_seeds, load_main_loop, load_runs  # noqa: E402
from src.runs.plots import plot_runs  # noqa: E402

args = sys.argv[1:] if as_script else []
results = Path(args[0] if args else os.environ.get("RESULTS_DIR", "results"))
out = Path(args[1] if len(args) > 1 else results / "comparison.png")

# %% [markdown]
# Every run under the folder, one row each: its config keys and how far and how well it got.

# %%
runs = load_runs(results)
for path, reason in runs.attrs["skipped"]:
    print(f"skipped {path}: {reason}")
print(runs[["run", "lr", "n_epochs", "state", "epochs_done", "best_valid_acc"]].to_string(index=False))

# %% [markdown]
# Which hyper-parameter matters? Mean best validation accuracy per learning rate, finished runs only.

# %%
finished = runs[runs["state"] == "finished"]
print(finished.groupby("lr")["best_valid_acc"].agg(["mean", "count"]))

# %% [markdown]
# Seeds aggregated: one row per configuration, mean ± std over its seeds (what `report.py --group-seeds` shows).

# %%
grouped = group_seeds(runs)
print(grouped[["n", "finished", "best_valid_acc_mean", "best_valid_acc_std", "training_hours_mean"]].to_string())

# %% [markdown]
# The best run in detail: its per-epoch log and its best weights.

# %%
best_name = finished.sort_values("best_valid_acc").iloc[-1]["run"]
best = load_main_loop(results / best_name)
print(f"best run: {best_name}")
print(best.log[["epoch", "train_loss", "valid_loss", "valid_acc", "lr"]].to_string(index=False))
n_weights = sum(p.numel() for p in best.best_model.parameters())
print(f"best weights: {type(best.best_model).__name__}, {n_weights} parameters")

# %% [markdown]
# Validation curves of every run in one figure.

# %%
plot_runs({name: load_main_loop(results / name).log for name in runs["run"]}, out, title=f"Runs in {results}")
print(f"wrote {out}")
