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

from src.bench.timing import cpu_name, median, synchronize, time_images  # noqa: E402
from src.cli import dispatch, exit_codes  # noqa: E402
from src.extensions import EMA  # noqa: E402
from src.bench.variants import Variant, all_variants  # noqa: E402
from src.main_loop import build_training_model, set_memory_format, train_step  # noqa: E402
from src.models import build_model  # noqa: E402
from src.training.kernels import TRIAL_BATCHES, candidate_name, candidates, fastest, time_candidates  # noqa: E402
from src.training.recipe import PLAIN, Recipe  # noqa: E402

# The recipe row: the papers' CIFAR-10 values (cutout 16, mixup alpha 1, smoothing 0.1) and a usual EMA decay.
RECIPE = {"ema": 0.999, "mixup": 1.0, "cutout": 16, "label_smoothing": 0.1}

# torch.compile's modes timed on CUDA (on a CPU only `default`, and only with --compile-too: 29 s to compile there).
COMPILE_MODES = ("default", "max-autotune-no-cudagraphs")
SCRATCH = "scratch"
RESULT_FILE = "scratch/bench.json"


class Bench:
    def __init__(self, config, data_dir, steps, device):
        from src.data import get_cifar

        self.config, self.data_dir, self.steps, self.device = config, data_dir, steps, device
        self.stream, self.valid = get_cifar("cifar10", True, config["batch_size"], 1, device,
                                            config["valid_size"], -1, data_dir=data_dir)
        # Distinct batches, as training sees them (one batch reused would sit in the CPU caches).
        self.batches = [batch for _, batch in zip(range(steps), self.stream.epoch(1), strict=False)]
        self.variants = all_variants(config, self.stream, device)
        # What a run of this config trains in: its own kernel trial, on the same model and batches.
        trial = time_candidates(candidates("auto", "auto", device), build_training_model(
            config, build_model, self.stream, device), set_memory_format, config, self.batches[:TRIAL_BATCHES],
            device, len(self.stream))
        self.kernels = fastest(trial)
        chosen = self.variants[candidate_name(self.kernels.precision, self.kernels.memory_format)]
        self.precision, self.memory_format, self.scaler = chosen.precision, chosen.memory_format, chosen.scaler
        self.best = chosen.model, chosen.optimizer  # the other rows run the chosen variant
        self.recipe_stream = copy.copy(self.stream).regularise(RECIPE["cutout"], RECIPE["mixup"])  # same data
        self.recipe = Recipe(label_smoothing=RECIPE["label_smoothing"])
        self.ema = EMA(self.best[0], RECIPE["ema"])
        for _ in range(3):  # warm-up: kernels chosen, memory allocated
            for variant in self.variants.values():
                self.bare(variant)
            self.recipe_off()
            self.recipe_on()

    def measurements(self):
        """name -> the measurement, one round of each in this order: every variant's bare step, then the rest."""
        bare = {f"bare {name}": (lambda v=variant: self.bare_rate(v)) for name, variant in self.variants.items()}
        rest = ("bare_best_one_thread", "stream_only", "end_to_end", "per_sample_reference", "evaluation",
                "checkpoint_ms", "recipe_off", "recipe_on")
        return {**bare, **{name: getattr(self, name) for name in rest}}

    def bare(self, variant):
        variant.steps(self.batches)

    def bare_rate(self, variant):
        return time_images(lambda: self.bare(variant), self.n_bare_images, self.device)

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

    @property
    def n_bare_images(self):
        return sum(len(labels) for _, labels in self.batches)

    def bare_best_one_thread(self):
        """The chosen variant's bare step on one thread."""
        import torch

        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return self.bare_rate(self.variants[candidate_name(self.precision, self.memory_format)])
        finally:
            torch.set_num_threads(threads)

    def stream_only(self):
        n_batches = min(len(self.stream), 10 * self.steps)

        def run():
            for _ in zip(range(n_batches), self.stream.epoch(2), strict=False):
                pass

        return time_images(run, n_batches * self.stream.batch_size, self.device)

    def end_to_end(self):
        """Three epochs through run_main_loop at the default config (every extension on, the kernels chosen by
        its own trial); the third one, from the second's log row to its own, covers everything a steady epoch
        costs: training, validation, the epoch-end checkpoint, log, curves.png and TensorBoard."""
        import io
        import json
        from contextlib import redirect_stdout

        from src.analysis import read_log
        from src.main_loop import run_main_loop
        from src.runs.names import META

        with tempfile.TemporaryDirectory(dir=self.data_dir) as folder, redirect_stdout(io.StringIO()):
            os.environ["DATA_DIR"] = str(self.data_dir)
            run_main_loop({**self.config, "n_epochs": 3}, Path(folder) / "run", build_model)
            log = read_log(Path(folder) / "run")
            meta = json.loads((Path(folder) / "run" / META).read_text())
        n_images = len(self.stream) * self.stream.batch_size
        return {"epoch": n_images / (log["finished_at"].iloc[2] - log["finished_at"].iloc[1]),
                "training": log["images_per_second"].iloc[2],
                "kernels": candidate_name(meta["precision"], meta["memory_format"]),
                "chosen_by": meta["kernels_chosen_by"]}

    def evaluation(self):
        from src.evaluation import evaluate, evaluation_batch

        model, batch = self.best[0], evaluation_batch(self.device, self.config["batch_size"])  # as the loop does
        return time_images(lambda: evaluate(model, *self.valid, self.device, self.precision, batch_size=batch),
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

    import torch

    from configs.simple_cnn import simple_cnn_configs
    from src.bench.epoch_costs import measure as measure_epoch_costs, print_table as print_epoch_costs
    from src.datasets.writer import write_cifar
    from src.training.hardware import choose_device, kernel_settings

    # The default config; the validation share of the training images is kept at its 5,000 of 50,000.
    config = {**simple_cnn_configs.get("cifar10"), "valid_size": n_images // 10}
    device = choose_device(config["device"])
    Path(SCRATCH).mkdir(exist_ok=True)  # the project's disk, as run folders are: /tmp may be a tmpfs
    # The kernels the loop runs with at the default keys (CUDA: cudnn.benchmark on; a CPU: nothing changes).
    with tempfile.TemporaryDirectory(dir=SCRATCH) as data_dir, kernel_settings(device, config["deterministic"]):
        write_cifar("cifar10", data_dir, n_train=n_images, n_test=100)
        bench = Bench(config, Path(data_dir), steps, device)
        measurements = bench.measurements()
        rounds = {name: [] for name in measurements}
        for r in range(repeats):
            for name, measure in measurements.items():
                rounds[name].append(measure())
            print(f"round {r + 1}/{repeats} done", file=sys.stderr)
        if compile_modes is not None:
            modes = [mode for mode in compile_modes.split(",") if mode]
        else:
            modes = COMPILE_MODES if device.type == "cuda" else COMPILE_MODES[:1] if compile_too else ()
        compiled = {mode: measure_compile(bench, mode) for mode in modes} or None
        only = set(epoch_costs_of.split(",")) if epoch_costs_of else None
        epoch_costs = measure_epoch_costs(bench, only, repeats, steps=steps if device.type == "cuda" else 2)

    result = summarise(rounds, bench)
    environment = {"device": str(device), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                   "precision": bench.precision, "memory_format": bench.memory_format,
                   "threads": torch.get_num_threads(), "torch": torch.__version__, "cpu": cpu_name(),
                   "batch_size": config["batch_size"], "n_images": n_images, "repeats": repeats, "steps": steps}
    if device.type == "cuda":
        environment["gpu"] = torch.cuda.get_device_name(device)
    print_table(result, environment, compiled)
    print_epoch_costs(epoch_costs, result["loop_fixed_seconds"], result["loop_fixed_share"])
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps({"medians": result, "rounds": rounds, "environment": environment,
                                     "compile": compiled, "epoch_costs": epoch_costs}, indent=2) + "\n")
    print(f"saved {out}")
    print(f"ratio (end-to-end epoch time / fastest bare step time ({result['bare_best_variant']}), per image): "
          f"{result['ratio']:.3f}")


def summarise(rounds, bench):
    """The medians, the fastest bare variant, and the loop's kernels (those of most of its rounds) against it."""
    result = {name: median(values) for name, values in rounds.items()
              if name != "end_to_end" and not name.startswith("bare ")}
    result["bare"] = {name.removeprefix("bare "): median(values) for name, values in rounds.items()
                      if name.startswith("bare ")}
    result["bare_best_variant"], best = max(result["bare"].items(), key=lambda item: item[1])
    result["bare_best"] = best
    result["bare_fp32"] = result["bare"]["fp32 contiguous"]
    result["bare_fp16"] = result["bare"].get("fp16 channels_last") if bench.device.type == "cuda" else None
    loop = [v["kernels"] for v in rounds["end_to_end"]]
    result["loop_kernels"] = max(set(loop), key=loop.count)
    result["loop_chosen_by"] = sorted({v["chosen_by"] for v in rounds["end_to_end"]})
    result["loop_kernels_gap"] = result["bare"][result["loop_kernels"]] / best
    result["end_to_end_epoch"] = median([v["epoch"] for v in rounds["end_to_end"]])
    result["end_to_end_training"] = median([v["training"] for v in rounds["end_to_end"]])
    result["ratio"] = best / result["end_to_end_epoch"]
    result["epoch_share_of_best"] = result["end_to_end_epoch"] / best
    epoch_ms_default = 1000 * 45000 / result["end_to_end_epoch"]
    result["checkpoint_share_of_default_epoch"] = result["checkpoint_ms"] / epoch_ms_default
    result["recipe_fraction"] = result["recipe_on"] / result["recipe_off"]
    # The default model's epoch in the loop beyond its training steps (validation, saves, log, TensorBoard).
    epoch_images = len(bench.stream) * bench.stream.batch_size
    result["loop_fixed_seconds"] = epoch_images / result["end_to_end_epoch"] - epoch_images / result[
        "end_to_end_training"]
    result["loop_fixed_share"] = result["end_to_end_training"] / result["end_to_end_epoch"] - 1
    return result


def measure_compile(bench, mode):
    """torch.compile of the training forward in `mode`, as `compile=true` does: the compile time (the first
    step, apart), then the steady-state rate against eager, measured alike just after."""
    import torch

    torch._dynamo.reset()  # each mode compiles afresh
    variant = Variant(bench.config, bench.stream, bench.device, bench.precision, bench.memory_format)
    eager = copy.copy(variant)
    variant.model = torch.compile(variant.model, mode=mode)
    started = time.perf_counter()
    train_step(variant.model, variant.optimizer, bench.batches[0], bench.device, bench.precision,
               scaler=variant.scaler)
    synchronize(bench.device)
    compile_seconds = time.perf_counter() - started
    for _ in range(3):
        bench.bare(variant)
    rates = [bench.bare_rate(variant) for _ in range(3)]
    eager = [bench.bare_rate(eager) for _ in range(3)]
    return {"compile_seconds": compile_seconds, "compiled_images_per_second": median(rates),
            "eager_images_per_second": median(eager)}


def print_table(result, environment, compiled):
    best = result["bare_best"]
    print(f"\n{environment['device']} ({environment['cpu']}; CPU capability {environment['cpu_capability']}), "
          f"{environment['threads']} threads, torch {environment['torch']}, batch {environment['batch_size']}, "
          f"medians of {environment['repeats']}")
    print(f"{'':72}{'images/s':>10}{'x best (a)':>12}")
    for name, rate in result["bare"].items():
        marks = [m for m, on in (("fastest", name == result["bare_best_variant"]),
                                 ("the loop's", name == result["loop_kernels"])) if on]
        label = f"(a) bare step, {name}" + (f"  <- {', '.join(marks)}" if marks else "")
        print(f"{label:72}{rate:10.0f}{rate / best:12.2f}")
    rows = [
        (f"    {environment['precision']} {environment['memory_format']} on 1 thread", result["bare_best_one_thread"]),
        ("(b) training stream alone", result["stream_only"]),
        ("(c) main loop, training part of the epoch", result["end_to_end_training"]),
        ("(c) main loop, whole epoch (+ validation, checkpoint, log, curves)", result["end_to_end_epoch"]),
        ("(e) reference: PIL + per-sample augmentation + DataLoader(2 workers)", result["per_sample_reference"]),
        ("(f) evaluation", result["evaluation"]),
    ]
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
    if result["bare_fp16"] is None:
        print("(a) bare step, fp16 + GradScaler: CUDA only (or a CPU with AMX-FP16), skipped on this device")
    for mode, row in (compiled or {}).items():
        rate, eager = row["compiled_images_per_second"], row["eager_images_per_second"]
        print(f"torch.compile mode={mode}: {row['compile_seconds']:.1f} s to compile, {rate:.0f} images/s compiled "
              f"vs {eager:.0f} eager ({rate / eager:.2f}x)")
    if not compiled:
        print("torch.compile: skipped on a CPU (29 s to compile, slower here); --compile-too measures mode default")
    print(f"(d) the loop trained in {result['loop_kernels']} (chosen by: {', '.join(result['loop_chosen_by'])}); "
          f"its bare step runs at {result['loop_kernels_gap']:.3f} of the fastest ({result['bare_best_variant']})")
    print(f"(d) the whole epoch runs at {result['epoch_share_of_best']:.3f} of the fastest bare step's rate "
          f"(time ratio {result['ratio']:.3f})")


if __name__ == "__main__":
    dispatch(main, description=__doc__)
