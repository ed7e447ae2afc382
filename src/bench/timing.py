"""What make bench's scripts share: timing on a device (the device's queue drained before and after), the
median of rounds, and the reference configs the models' rows are measured on.
"""
import time
from pathlib import Path

from src.training.kernels import synchronize  # the kernel trial's own: the bench times its rows alike

# (family, named config, batch for the speed): the big models' batches are smaller so a step stays seconds here.
CONFIGS = [("simple_cnn", "cifar10", 128), ("resnet", "resnet20", 128), ("resnet", "resnet56", 128),
           ("resnet", "resnet110", 64), ("wrn", "wrn_16_4", 64), ("wrn", "wrn_28_10", 16),
           ("preact_resnet", "preact_resnet18", 32), ("vgg", "vgg11_bn", 64), ("vgg", "vgg16_bn", 64),
           ("fast", "fast", 256)]  # the fast recipe's batch is 1024: on a GPU, time it with --batch 1024


def cpu_name():
    """The CPU's model name (/proc/cpuinfo), else what platform knows."""
    import platform

    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()



def timed(run, device, repeats):
    """Median seconds of `run()`, device work included."""
    seconds = []
    for _ in range(repeats):
        synchronize(device)
        started = time.perf_counter()
        run()
        synchronize(device)
        seconds.append(time.perf_counter() - started)
    return median(seconds)


def time_images(run, n_images, device):
    """Images per second of `run()` (which processes `n_images`), device work included."""
    return n_images / timed(run, device, 1)


def median(values):
    if any(value is None for value in values):  # a row this device skips
        return None
    ordered = sorted(values)
    return ordered[len(ordered) // 2]
