"""make bench's per-epoch fixed cost: what each epoch costs beyond its training steps, for every reference
model, in seconds and as a share of that model's training epoch (45,000 images). Measured by src/scripts/bench.py.

The parts, each timed with the code the main loop runs (medians of `repeats`):
    validation        src.evaluation on the validation split (5,000 images; on a CPU, 128 of them once, scaled)
    best model        best_model.pt written (at most once per epoch: when the accuracy improved)
    checkpoint        model, optimizer and loop state, checksummed and fsynced, then log.jsonl and status.json
    tensorboard       the epoch's scalars, flushed, and the curves.png request (the drawing is off-thread)
The drawing of curves.png itself runs on its own thread at most every `plot_every_seconds`; its time is
given once, with the share of the training time it can take at most (drawing seconds / interval).
"""
import tempfile
from pathlib import Path

from src.bench.timing import CONFIGS, timed
from src.runs.names import BEST_MODEL, CURVES

# A CPU validates the big models at a few images/s (WRN-28-10: about 15): time one slice once, scale it up.
CPU_VALIDATION_IMAGES = 128
LOG_ROWS = 30  # log.jsonl and curves.png of a 30-epoch run (the simple CNN's default), rewritten each epoch


def a_log(n_rows):
    return [{"epoch": e, "iteration": 351 * e, "train_loss": 2.0 / e, "train_acc": 1 - 1 / (e + 1),
             "valid_loss": 2.1 / e, "valid_acc": 1 - 1.1 / (e + 1), "lr": 0.1, "epoch_seconds": 15.0,
             "images_per_second": 3000.0, "finished_at": 1.8e9 + 15 * e} for e in range(1, n_rows + 1)]


def shared_parts(folder, repeats):
    """(TensorBoard scalars + the drawing request, one drawing of curves.png), in seconds: the same for every model."""
    import pandas as pd
    import torch

    from src.extensions.monitoring import Monitors
    from src.runs.plots import plot_curves
    from src.runs.folder import RunFolder

    log = a_log(LOG_ROWS)
    monitors = Monitors(RunFolder(folder), True, 0, plot_every_seconds=1e9)
    monitors.epoch(log)  # warm-up: the writer made, TensorBoard imported, the first drawing started
    monitors.settle()
    cpu = torch.device("cpu")  # host work only: nothing to wait for on a device
    tensorboard = timed(lambda: monitors.epoch(log), cpu, repeats)
    monitors.close()
    drawing = timed(lambda: plot_curves(pd.DataFrame(log), folder / CURVES, "bench"), cpu, repeats)
    return tensorboard, drawing


def model_parts(config, bench, batch, steps, repeats, folder):
    """-> {training epoch, validation, best model, checkpoint} in seconds for `config`'s model."""
    import torch

    from src.runs.checkpoints import save_tensors
    from src.evaluation import evaluation_batch, validation_columns
    from src.main_loop import training_model
    from src.models import build_model
    from src.training.recipe import train_step
    from src.runs.folder import RunFolder

    device, precision = bench.device, bench.precision
    model, optimizer = training_model(config, build_model, bench.stream, device, bench.memory_format)
    images, labels = bench.batches[0]
    reps = -(-batch // len(labels))
    batch_of = (images.repeat(reps, 1, 1, 1)[:batch], labels.repeat(reps)[:batch])
    train_step(model, optimizer, batch_of, device, precision, scaler=bench.scaler)  # warm-up, momentum made
    step = timed(lambda: [train_step(model, optimizer, batch_of, device, precision, scaler=bench.scaler)
                          for _ in range(steps)], device, 1) / steps
    valid_images, valid_labels = bench.valid
    cuda = device.type == "cuda"
    n = len(valid_labels) if cuda else min(len(valid_labels), CPU_VALIDATION_IMAGES)
    batch_of_valid = evaluation_batch(device, config["batch_size"])  # as the main loop validates
    validation = timed(lambda: validation_columns(model, valid_images[:n], valid_labels[:n], device, precision,
                                                  batch_of_valid), device, repeats if cuda else 1)
    validation *= len(valid_labels) / n
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
             "trainer": {"iteration": 1, "epoch_length": 1, "max_epochs": 1},
             "progress": {"log": a_log(LOG_ROWS), "best_valid_acc": 0.5,
                          "rank_sums": [torch.zeros(3, dtype=torch.float64)], "seconds_before": 0.0}}
    run_folder, status = RunFolder(folder), {"epochs_done": LOG_ROWS, "finished": False}
    checkpoint = timed(lambda: (save_tensors(state, folder / "checkpoint_1.pt", checksum=True),
                                run_folder.write_progress(state["progress"]["log"], status)), device, repeats)
    best = timed(lambda: save_tensors(model.state_dict(), folder / BEST_MODEL), device, repeats)
    return {"training_epoch": 45000 / batch * step, "validation": validation, "best_model": best,
            "checkpoint": checkpoint}


def measure(bench, only=None, repeats=3, steps=2):
    """The fixed cost of an epoch of each reference model (src.bench.timing.CONFIGS), at the default keys."""
    from configs.training import TRAINING_ROOT
    from configs import family

    rows = []
    with tempfile.TemporaryDirectory(dir=bench.data_dir) as folder:
        folder = Path(folder)
        tensorboard, drawing = shared_parts(folder, repeats)
        for model_family, name, cpu_batch in CONFIGS:
            if only is not None and name not in only:
                continue
            config = family(model_family).get(name)
            batch = config["batch_size"] if bench.device.type == "cuda" else cpu_batch
            parts = model_parts(config, bench, batch, steps, repeats, folder)
            fixed = parts["validation"] + parts["best_model"] + parts["checkpoint"] + tensorboard
            rows.append({"config": name, **parts, "tensorboard": tensorboard, "fixed": fixed,
                         "share": fixed / parts["training_epoch"]})
    every = TRAINING_ROOT["plot_every_seconds"]
    return {"models": rows, "validation_images": len(bench.valid[1]), "curves_drawing": drawing,
            "plot_every_seconds": every,
            "curves_share_at_most": drawing / every if every else None}


def print_table(costs, loop_seconds, loop_share):
    print(f"\nper-epoch fixed cost (validation of {costs['validation_images']:,} images, best model, checkpoint + "
          "log + status, TensorBoard), s, and its share of the model's training epoch of 45,000 images:")
    print(f"{'config':18}{'epoch':>9}{'valid':>9}{'best':>8}{'ckpt':>8}{'tboard':>8}{'fixed':>9}{'share':>8}")
    for row in costs["models"]:
        print(f"{row['config']:18}{row['training_epoch']:9.2f}{row['validation']:9.3f}{row['best_model']:8.3f}"
              f"{row['checkpoint']:8.3f}{row['tensorboard']:8.3f}{row['fixed']:9.3f}{100 * row['share']:7.1f}%")
    every = costs["plot_every_seconds"]
    bound = f"at most {100 * costs['curves_share_at_most']:.2f}% of the time" if every else "every epoch"
    print(f"curves.png: {costs['curves_drawing']:.2f} s a drawing, off the training thread, at most every "
          f"{every:g} s ({bound})")
    print(f"(c) in the main loop, default model: {loop_seconds:.3f} s per epoch beyond its training "
          f"({100 * loop_share:.1f}% of its training time)")
