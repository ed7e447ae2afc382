"""make bench, the outside check: what one steady epoch of the runner costs, seen from outside, against the fastest
bare training step of the same model.

    python src/scripts/bench_epoch.py [--repeats 3] [--n-images 50000] [--config cifar10] [--out FILE]

A run of the default config trains its first epoch (the kernel trial included); copies of that folder are then
resumed by whole processes to 2 and to 3 epochs, and the difference of the two wall times is one steady epoch
with everything it costs (training, validation, checkpoints, log, TensorBoard, curves.png) and nothing of the
start-up. Between those processes this one times the bare step of every candidate precision and memory format
(src.bench.variants), so all are measured interleaved, round by round; medians are reported. The share printed
last is (the epoch's images / the fastest bare rate) / the steady epoch's seconds, from the medians and as
the median of each round's own (a shared machine's speed drifts between rounds): 1.0 would be a loop that
costs nothing beyond its steps; and against the bare step of the kernels the runner chose. The first epoch
must be long enough for the kernel trial (300 steps: about 43,000 training images at batch 128), or the
runner takes the old rule for the whole run; the default --n-images 50000 is.
"""
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from anywhere, no PYTHONPATH
os.environ.setdefault("PYTORCH_JIT", "0")  # as the runners do

from src.bench.timing import cpu_name, median, time_images  # noqa: E402
from src.cli import dispatch, exit_codes  # noqa: E402
from src.errors import UsageError  # noqa: E402

RUNNER = Path(__file__).resolve().parent / "train_simple_CNN.py"
STEPS = 40  # bare steps per timing, on distinct batches: 5 s of the default model on a 2-core AVX2 CPU
RESULT_FILE = "scratch/bench_epoch.json"


def train(run, n_epochs, config, data_dir, valid_size):
    """Wall seconds of the runner, as a user starts it, training (or resuming) `run` to `n_epochs`."""
    started = time.perf_counter()
    command = [sys.executable, str(RUNNER), config, str(run), f"--n_epochs={n_epochs}", f"--valid_size={valid_size}"]
    result = subprocess.run(command,
                            env={**os.environ, "DATA_DIR": str(data_dir)}, capture_output=True, text=True)
    if result.returncode:
        raise RuntimeError(f"the runner failed on {run}: {result.stderr.strip()[-300:]}")
    return time.perf_counter() - started


def bare_rates(config, data_dir, device, steps=STEPS):
    """name -> a function timing `steps` bare steps of that variant (images/s)."""
    from src.bench.variants import all_variants
    from src.data import get_cifar

    stream, _ = get_cifar(config["dataset"], True, config["batch_size"], config["seed"], device,
                          config["valid_size"], -1, data_dir=data_dir)
    batches = [batch for _, batch in zip(range(steps), stream.epoch(1), strict=False)]
    variants = all_variants(config, stream, device)
    for variant in variants.values():
        variant.steps(batches[:3])  # warm-up
    n_images = sum(len(labels) for _, labels in batches)
    timers = {name: (lambda v=v: time_images(lambda: v.steps(batches), n_images, device))
              for name, v in variants.items()}
    return timers, len(stream) * stream.batch_size


@exit_codes
def main(*, repeats=3, n_images=50000, config="cifar10", steps=STEPS, out=RESULT_FILE):
    """Whole-process time of a 3-epoch resume minus a 2-epoch resume of the same 1-epoch folder, against the
    fastest bare step of every candidate (`steps` of them per timing), interleaved (medians of `repeats`)."""
    import torch

    from configs.simple_cnn import simple_cnn_configs
    from src.datasets.writer import write_cifar
    from src.training.hardware import choose_device

    if repeats < 1 or n_images < 1000 or steps < 1:
        raise UsageError("--repeats and --steps must be at least 1, --n-images at least 1000")
    settings = {**simple_cnn_configs.get(config), "valid_size": n_images // 10}
    device = choose_device(settings["device"])
    Path("scratch").mkdir(exist_ok=True)  # the project's disk, as run folders are: /tmp may be a tmpfs
    with tempfile.TemporaryDirectory(dir="scratch") as folder:
        folder = Path(folder)
        write_cifar("cifar10", folder / "data", n_train=n_images, n_test=100)
        # The first epoch, with the kernel trial; then the timed resumes of copies of it.
        train(folder / "base", 1, config, folder / "data", settings["valid_size"])
        kernels = json.loads((folder / "base" / "meta.json").read_text())
        timers, epoch_images = bare_rates(settings, folder / "data", device, steps)
        rounds = measure_rounds(folder, config, settings["valid_size"], timers, epoch_images, repeats)
    bare = {name: median(rounds[name]) for name in timers}
    best = max(bare, key=bare.get)
    epoch = median(rounds["epoch_seconds"])
    result = {"epoch_seconds": epoch, "bare": bare, "fastest": best, "epoch_images": epoch_images,
              "share_of_fastest_bare_step": epoch_images / bare[best] / epoch,
              "share_by_round": median(rounds["share"]),
              "share_of_own_bare_step": epoch_images / bare[f"{kernels['precision']} {kernels['memory_format']}"]
              / epoch,
              "loop_kernels": f"{kernels['precision']} {kernels['memory_format']}",
              "chosen_by": kernels["kernels_chosen_by"], "rounds": rounds,
              "environment": {"device": str(device), "cpu": cpu_name(), "threads": torch.get_num_threads(),
                              "cpu_capability": torch.backends.cpu.get_cpu_capability(), "torch": torch.__version__,
                              "n_images": n_images, "repeats": repeats, "config": config}}
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(result, indent=2) + "\n")
    print_result(result)


def measure_rounds(folder, config, valid_size, timers, epoch_images, repeats):
    """Each round: every variant's bare step, then copies of folder/base resumed to 2 and to 3 epochs."""
    rounds = {"epoch_seconds": [], "share": [], **{name: [] for name in timers}}
    for r in range(repeats):
        for name, timer in timers.items():
            rounds[name].append(timer())
        seconds = {}
        for n_epochs in (2, 3):
            run = folder / f"run_{r}_{n_epochs}"
            shutil.copytree(folder / "base", run)
            seconds[n_epochs] = train(run, n_epochs, config, folder / "data", valid_size)
            shutil.rmtree(run)
        rounds["epoch_seconds"].append(seconds[3] - seconds[2])
        fastest_now = max(rounds[name][-1] for name in timers)  # this round's, measured next to its runs
        rounds["share"].append(epoch_images / fastest_now / rounds["epoch_seconds"][-1])
        print(f"round {r + 1}/{repeats} done", file=sys.stderr)
    return rounds


def print_result(result):
    env, rounds, epoch, best = result["environment"], result["rounds"], result["epoch_seconds"], result["fastest"]
    print(f"{env['device']} ({env['cpu']}; CPU capability {env['cpu_capability']}), {env['threads']} threads, "
          f"torch {env['torch']}, medians of {env['repeats']}")
    for name, rate in result["bare"].items():
        print(f"bare step, {name:28}{rate:9.0f} images/s")
    print(f"the runner trained in {result['loop_kernels']} ({result['chosen_by']}); one steady epoch of "
          f"{result['epoch_images']} images, seen from outside: {epoch:.2f} s")
    print(f"the whole epoch runs at {result['share_of_fastest_bare_step']:.3f} of the fastest bare step ({best}); "
          f"the median of each round's share: {result['share_by_round']:.3f} "
          f"({', '.join(f'{share:.3f}' for share in rounds['share'])}); against the bare step of its own kernels: "
          f"{result['share_of_own_bare_step']:.3f}")


if __name__ == "__main__":
    dispatch(main, description=__doc__)
