"""make bench: what one training step of the default model costs, what a whole epoch costs around it, what
the full regularisation recipe (EMA, mixup, cutout, label smoothing) costs on top of the plain step, what
each epoch's bookkeeping costs for every reference model (src/bench/epoch_costs.py), and on CUDA the fp16 step
and torch.compile's modes (compile time apart).

Everything is measured in one process, interleaved (one round of every measurement, then the
next round), and reported as medians, so that a noisy shared machine moves all rows alike. The
number that matters is the last line: the main loop's time per image over the bare step's.
"""
import copy
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from anywhere, no PYTHONPATH
os.environ.setdefault("PYTORCH_JIT", "0")  # as train_simple_CNN.py does

from src.bench.timing import median, synchronize, time_images  # noqa: E402
from src.cli import dispatch, exit_codes  # noqa: E402
from src.extensions import EMA  # noqa: E402
from src.training.hardware import grad_scaler  # noqa: E402
from src.main_loop import build_training_model, train_step  # noqa: E402  (the loop's own step, timed bare)
from src.models import build_model  # noqa: E402
from src.training.recipe import PLAIN, Recipe  # noqa: E402

# The recipe row: the papers' CIFAR-10 values (cutout 16, mixup alpha 1, smoothing 0.1) and a usual EMA decay.
RECIPE = {"ema": 0.999, "mixup": 1.0, "cutout": 16, "label_smoothing": 0.1}

# torch.compile's modes timed on CUDA (on a CPU only `default`, and only with --compile-too: 29 s to compile there).
COMPILE_MODES = ("default", "max-autotune-no-cudagraphs")
SCRATCH = "scratch"
RESULT_FILE = "scratch/bench.json"


def make_model(config, stream, device, precision):
    """The model and optimizer exactly as the main loop builds them (same seed, statistics, memory format)."""
    return build_training_model(config, build_model, stream, device, precision)


class Bench:
    def __init__(self, config, data_dir, steps, device, precision):
        from src.data import get_cifar

        self.config, self.data_dir, self.steps = config, data_dir, steps
        self.device, self.precision = device, precision
        self.channels_last = device.type == "cuda" or precision == "bf16"  # as build_training_model decides
        self.stream, self.valid = get_cifar("cifar10", True, config["batch_size"], 1, device,
                                            config["valid_size"], -1, data_dir=data_dir)
        # Distinct batches, as training sees them (one batch reused would sit in the CPU caches).
        self.batches = [batch for _, batch in zip(range(steps), self.stream.epoch(1), strict=False)]
        self.fp32 = make_model(config, self.stream, device, "fp32")
        self.best = make_model(config, self.stream, device, precision)
        self.scaler = grad_scaler(device, precision)  # fp16 (auto on a GPU without bf16): the loop's scaler
        # On CUDA, fp16 with its scaler whatever auto picks: the choice on a V100, T4 or P100.
        self.fp16 = make_model(config, self.stream, device, "fp16") if device.type == "cuda" else None
        self.fp16_scaler = grad_scaler(device, "fp16") if self.fp16 else None
        self.recipe_stream = copy.copy(self.stream).regularise(RECIPE["cutout"], RECIPE["mixup"])  # same data
        self.recipe = Recipe(label_smoothing=RECIPE["label_smoothing"])
        self.ema = EMA(self.best[0], RECIPE["ema"])
        for _ in range(3):  # warm-up: kernels chosen, memory allocated
            self.bare(*self.fp32, "fp32")
            self.bare(*self.best, precision, self.scaler)
            if self.fp16:
                self.bare(*self.fp16, "fp16", self.fp16_scaler)
            self.recipe_off()
            self.recipe_on()

    def bare(self, model, optimizer, precision, scaler=None):
        for batch in self.batches:
            train_step(model, optimizer, batch, self.device, precision, scaler=scaler)

    def stream_and_step(self, stream, recipe, ema):
        """`steps` batches drawn from `stream` and stepped on the best model, as the main loop's step does."""
        model, optimizer = self.best

        def run():
            for _, batch in zip(range(self.steps), stream.epoch(3), strict=False):
                train_step(model, optimizer, batch, self.device, self.precision, recipe, self.scaler)
                if ema is not None:
                    ema.update()

        return time_images(run, self.steps * stream.batch_size, self.device)

    def recipe_off(self):
        """The plain step with its stream (crop and flip), to compare the recipe with."""
        return self.stream_and_step(self.stream, PLAIN, None)

    def recipe_on(self):
        """The same with EMA, mixup, cutout and label smoothing all on."""
        return self.stream_and_step(self.recipe_stream, self.recipe, self.ema)

    def bare_fp32(self):
        return time_images(lambda: self.bare(*self.fp32, "fp32"), self.n_bare_images, self.device)

    def bare_best(self):
        return time_images(lambda: self.bare(*self.best, self.precision, self.scaler), self.n_bare_images,
                           self.device)

    def bare_fp16(self):
        """CUDA only (None elsewhere): fp16 autocast with its gradient scaler, channels_last."""
        if self.fp16 is None:
            return None
        return time_images(lambda: self.bare(*self.fp16, "fp16", self.fp16_scaler), self.n_bare_images,
                           self.device)

    @property
    def n_bare_images(self):
        return sum(len(labels) for _, labels in self.batches)

    def bare_best_one_thread(self):
        import torch

        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return self.bare_best()
        finally:
            torch.set_num_threads(threads)

    def stream_only(self):
        n_batches = min(len(self.stream), 10 * self.steps)

        def run():
            for _ in zip(range(n_batches), self.stream.epoch(2), strict=False):
                pass

        return time_images(run, n_batches * self.stream.batch_size, self.device)

    def end_to_end(self):
        """Three epochs through run_main_loop at the default config (every extension on); the third one,
        from the second's log row to its own, covers everything a steady epoch costs: training,
        validation, the epoch-end checkpoint, log, curves.png and TensorBoard."""
        import io
        from contextlib import redirect_stdout

        from src.analysis import read_log
        from src.main_loop import run_main_loop

        with tempfile.TemporaryDirectory(dir=self.data_dir) as folder, redirect_stdout(io.StringIO()):
            os.environ["DATA_DIR"] = str(self.data_dir)
            run_main_loop({**self.config, "n_epochs": 3}, Path(folder) / "run", build_model)
            log = read_log(Path(folder) / "run")
        n_images = len(self.stream) * self.stream.batch_size
        return {"epoch": n_images / (log["finished_at"].iloc[2] - log["finished_at"].iloc[1]),
                "training": log["images_per_second"].iloc[2]}

    def evaluation(self):
        from src.evaluation import evaluate

        model = self.best[0]
        return time_images(lambda: evaluate(model, *self.valid, self.device, self.precision, batch_size=512),
                           len(self.valid[1]), self.device)

    def checkpoint_ms(self):
        """One checkpoint of the default model with its optimizer state, written as the main loop writes it."""
        from src.runs.checkpoints import save_tensors

        model, optimizer = self.best
        contents = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                    "trainer": {"iteration": 1, "epoch_length": 1, "max_epochs": 1}}
        with tempfile.TemporaryDirectory(dir=self.data_dir) as folder:
            started = time.perf_counter()
            save_tensors(contents, Path(folder) / "checkpoint_1.pt", checksum=True)  # as the main loop writes it
            return 1000 * (time.perf_counter() - started)

    def per_sample_reference(self):
        """The usual pipeline: PIL images, per-sample crop and flip, a DataLoader with 2 worker processes."""
        import torch

        loader = torch.utils.data.DataLoader(PilCifar(self.stream.images.cpu(), self.stream.labels.cpu()),
                                             batch_size=self.config["batch_size"], shuffle=True, num_workers=2,
                                             drop_last=True)
        batches = iter(loader)
        next(batches)  # worker start-up is not counted
        model, optimizer = self.best

        def run():
            for _, (images, labels) in zip(range(self.steps), batches, strict=False):
                train_step(model, optimizer, (images.to(self.device), labels.to(self.device)), self.device,
                           self.precision, scaler=self.scaler)

        return time_images(run, self.steps * self.config["batch_size"], self.device)


class PilCifar:
    """A torch Dataset as the tutorials write it: a PIL image per sample, augmented one at a time."""

    def __init__(self, images, labels):
        from PIL import Image

        self.images = [Image.fromarray(image.permute(1, 2, 0).numpy()) for image in images]
        self.labels = labels

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        import random

        import numpy as np
        import torch
        from PIL import ImageOps

        image = ImageOps.expand(self.images[i], border=4, fill=0)
        left, top = random.randint(0, 8), random.randint(0, 8)
        image = image.crop((left, top, left + 32, top + 32))
        if random.random() < 0.5:
            image = ImageOps.mirror(image)
        return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1), self.labels[i]


@exit_codes
def main(*, n_images=50000, repeats=3, steps=20, out=RESULT_FILE, compile_too=False, compile_modes=None,
         epoch_costs_of=None):
    """Measure the default model's bare step against the main loop, on a learnable CIFAR-10-format archive.
    `compile_modes`: torch.compile's modes to time (comma-separated; default both of COMPILE_MODES on CUDA,
    none on a CPU, `default` there with --compile-too). `epoch_costs_of`: the configs (comma-separated) whose
    per-epoch fixed cost is measured; default all."""
    import json
    import platform

    import torch

    from configs.simple_cnn import simple_cnn_configs
    from src.datasets.writer import write_cifar
    from src.training.hardware import choose_device, choose_precision, kernel_settings
    from src.bench.epoch_costs import measure as measure_epoch_costs, print_table as print_epoch_costs

    # The default config; the validation share of the training images is kept at its 5,000 of 50,000.
    config = {**simple_cnn_configs.get("cifar10"), "valid_size": n_images // 10}
    device = choose_device(config["device"])
    precision = choose_precision(config["precision"], device)
    Path(SCRATCH).mkdir(exist_ok=True)  # the project's disk, as run folders are: /tmp may be a tmpfs
    # The kernels the loop runs with at the default keys (CUDA: cudnn.benchmark on; a CPU: nothing changes).
    with tempfile.TemporaryDirectory(dir=SCRATCH) as data_dir, kernel_settings(device, config["deterministic"]):
        write_cifar("cifar10", data_dir, n_train=n_images, n_test=100)
        bench = Bench(config, Path(data_dir), steps, device, precision)
        rounds = {name: [] for name in ("bare_fp32", "bare_best", "bare_fp16", "bare_best_one_thread", "stream_only",
                                        "end_to_end", "per_sample_reference", "evaluation", "checkpoint_ms",
                                        "recipe_off", "recipe_on")}
        for r in range(repeats):
            for name, values in rounds.items():
                values.append(getattr(bench, name)())
            print(f"round {r + 1}/{repeats} done", file=sys.stderr)
        if compile_modes is not None:
            modes = [mode for mode in compile_modes.split(",") if mode]
        else:
            modes = COMPILE_MODES if device.type == "cuda" else COMPILE_MODES[:1] if compile_too else ()
        compiled = {mode: measure_compile(bench, mode) for mode in modes} or None
        only = set(epoch_costs_of.split(",")) if epoch_costs_of else None
        epoch_costs = measure_epoch_costs(bench, only, repeats, steps=steps if device.type == "cuda" else 2)

    result = {name: median(values) for name, values in rounds.items() if name != "end_to_end"}
    result["end_to_end_epoch"] = median([v["epoch"] for v in rounds["end_to_end"]])
    result["end_to_end_training"] = median([v["training"] for v in rounds["end_to_end"]])
    best = result["bare_best"]
    result["ratio"] = best / result["end_to_end_epoch"]
    epoch_ms_default = 1000 * 45000 / result["end_to_end_epoch"]
    result["checkpoint_share_of_default_epoch"] = result["checkpoint_ms"] / epoch_ms_default
    result["recipe_fraction"] = result["recipe_on"] / result["recipe_off"]
    # The default model's epoch in the loop beyond its training steps (validation, saves, log, TensorBoard).
    epoch_images = len(bench.stream) * bench.stream.batch_size
    result["loop_fixed_seconds"] = epoch_images / result["end_to_end_epoch"] - epoch_images / result[
        "end_to_end_training"]
    result["loop_fixed_share"] = result["end_to_end_training"] / result["end_to_end_epoch"] - 1
    environment = {"device": str(device), "precision": precision, "channels_last": bench.channels_last,
                   "threads": torch.get_num_threads(), "torch": torch.__version__,
                   "cpu": platform.processor() or platform.machine(), "batch_size": config["batch_size"],
                   "n_images": n_images, "repeats": repeats, "steps": steps}
    if device.type == "cuda":
        environment["gpu"] = torch.cuda.get_device_name(device)
    print_table(result, environment, compiled)
    print_epoch_costs(epoch_costs, result["loop_fixed_seconds"], result["loop_fixed_share"])
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps({"medians": result, "rounds": rounds, "environment": environment,
                                     "compile": compiled, "epoch_costs": epoch_costs}, indent=2) + "\n")
    print(f"saved {out}")
    print(f"ratio (end-to-end epoch time / bare {precision} step time, per image): {result['ratio']:.3f}")


def measure_compile(bench, mode):
    """torch.compile of the training forward in `mode`, as `compile=true` does: the compile time (the first
    step, apart), then the steady-state rate against eager, measured alike just after."""
    import torch

    torch._dynamo.reset()  # each mode compiles afresh
    model, optimizer = make_model(bench.config, bench.stream, bench.device, bench.precision)
    compiled = torch.compile(model, mode=mode)
    scaler = grad_scaler(bench.device, bench.precision)
    started = time.perf_counter()
    train_step(compiled, optimizer, bench.batches[0], bench.device, bench.precision, scaler=scaler)
    synchronize(bench.device)
    compile_seconds = time.perf_counter() - started
    for _ in range(3):
        train_step(compiled, optimizer, bench.batches[0], bench.device, bench.precision, scaler=scaler)
    rates = [time_images(lambda: bench.bare(compiled, optimizer, bench.precision, scaler), bench.n_bare_images,
                         bench.device) for _ in range(3)]
    eager = [bench.bare_best() for _ in range(3)]
    return {"compile_seconds": compile_seconds, "compiled_images_per_second": median(rates),
            "eager_images_per_second": median(eager)}


def print_table(result, environment, compiled):
    best = result["bare_best"]
    rows = [
        (f"(a) bare step, fp32, {'channels_last' if environment['device'].startswith('cuda') else 'NCHW'}",
         result["bare_fp32"]),
        (f"(a) bare step, {environment['precision']}, "
         f"{'channels_last' if environment['channels_last'] else 'NCHW'}", best),
        ("    the same on 1 thread", result["bare_best_one_thread"]),
        ("(b) training stream alone", result["stream_only"]),
        ("(c) main loop, training part of the epoch", result["end_to_end_training"]),
        ("(c) main loop, whole epoch (+ validation, checkpoint, log, curves)", result["end_to_end_epoch"]),
        ("(e) reference: PIL + per-sample augmentation + DataLoader(2 workers)", result["per_sample_reference"]),
        ("(f) evaluation", result["evaluation"]),
    ]
    print(f"\n{environment['device']} ({environment['cpu']}), {environment['threads']} threads, "
          f"torch {environment['torch']}, batch {environment['batch_size']}, medians of {environment['repeats']}")
    print(f"{'':72}{'images/s':>10}{'x best (a)':>12}")
    for name, rate in rows:
        print(f"{name:72}{rate:10.0f}{rate / best:12.2f}")
    print(f"{'(g) one checkpoint (default model + optimizer), ms':72}{result['checkpoint_ms']:10.1f}"
          f"{'':>4}{100 * result['checkpoint_share_of_default_epoch']:.2f}% of a default epoch")
    print(f"{'(h) stream + step, plain (crop, flip)':72}{result['recipe_off']:10.0f}"
          f"{result['recipe_off'] / best:12.2f}")
    print(f"{'(h) stream + step, + EMA, mixup, cutout, label smoothing':72}{result['recipe_on']:10.0f}"
          f"{result['recipe_on'] / best:12.2f}")
    print(f"(h) the full recipe runs at {result['recipe_fraction']:.3f} of the plain step's rate "
          f"({100 * (1 / result['recipe_fraction'] - 1):+.1f}% time per image)")
    if result["bare_fp16"] is not None:
        print(f"{'(a) bare step, fp16 autocast + GradScaler, channels_last':72}{result['bare_fp16']:10.0f}"
              f"{result['bare_fp16'] / best:12.2f}")
    else:
        print("(a) bare step, fp16 + GradScaler: CUDA only, skipped on this device")
    for mode, row in (compiled or {}).items():
        rate, eager = row["compiled_images_per_second"], row["eager_images_per_second"]
        print(f"torch.compile mode={mode}: {row['compile_seconds']:.1f} s to compile, {rate:.0f} images/s compiled "
              f"vs {eager:.0f} eager ({rate / eager:.2f}x)")
    if not compiled:
        print("torch.compile: skipped on a CPU (29 s to compile, slower here); --compile-too measures mode default")
    print(f"(d) ratio, whole epoch vs best bare step: {result['ratio']:.3f}")


if __name__ == "__main__":
    dispatch(main, description=__doc__)
