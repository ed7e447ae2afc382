"""make bench, the models' part: for each reference config, its parameters, multiply-accumulates per image and
the training step's speed here: python src/scripts/bench_models.py [--steps N] [--out FILE] [--only NAME,...]

Parameters and MACs are counted by torch (`torch.utils.flop_counter`: convolutions and dense layers, one
32x32 image, MACs = FLOPs / 2) through `src.networks.size`, as every run records them in its meta.json. The
speed is the bare training step (forward, backward, optimizer; the main loop's own `train_step`, model and
optimizer built as the main loop builds them) on `--steps` random uint8 batches, timed by a run's own kernel
trial (src.training.kernels: a warm-up step, then interleaved rounds of every candidate precision and memory
format), in the fastest candidate, as `auto` picks it; an epoch of 45,000 images is that rate's time, so the
loop's small overhead (docs/performance.md) comes on top.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from anywhere, no PYTHONPATH

from src.signals import exit_at_once_on  # noqa: E402  (os and signal only: in place before the slow imports)

if __name__ == "__main__":
    exit_at_once_on("SIGINT", "SIGTERM")

from src.bench.timing import CONFIGS  # noqa: E402
from src.cli import dispatch, exit_codes  # noqa: E402
from src.errors import UsageError  # noqa: E402

RESULT_FILE = "scratch/bench_models.json"


def measure(config, batch, steps, device):
    """(parameters, MACs per image, training images per second, the kernels timed fastest, {candidate: images per
    second}) of `config`'s model."""
    import types

    import torch

    from src.main_loop import build_training_model, set_memory_format
    from src.models import build_model
    from src.networks.size import model_size
    from src.training.kernels import candidate_name, candidates, time_candidates

    # Random training images, for a model whose initialisation reads them (src/fast.py's whitening).
    images = torch.randint(0, 256, (1000, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    stream = types.SimpleNamespace(mean=torch.full((1, 3, 1, 1), 120.0), std=torch.full((1, 3, 1, 1), 60.0),
                                   images=images)
    model = build_training_model(config, build_model, stream, device)
    size = model_size(model)  # what a run records in meta.json
    generator = torch.Generator().manual_seed(0)
    n_classes = model(torch.zeros(1, 3, 32, 32, dtype=torch.uint8, device=device)).shape[1]
    batches = [(torch.randint(0, 256, (batch, 3, 32, 32), dtype=torch.uint8, generator=generator).to(device),
                torch.randint(0, n_classes, (batch,), generator=generator).to(device)) for _ in range(steps)]
    trial = time_candidates(candidates("auto", "auto", device), model, set_memory_format, config, batches, device,
                            45000 // batch)
    pair, rate = max(trial["images_per_second"].items(), key=lambda item: item[1])
    rates = {candidate_name(*candidate): value for candidate, value in trial["images_per_second"].items()}
    return size["parameters"], size["macs_per_image"], rate, candidate_name(*pair), rates


@exit_codes
def main(*, steps=3, out=RESULT_FILE, only=None, batch=0):
    """Parameters, MACs per image and training images/s of each reference config's model (--batch: one batch
    size for every model instead of each its own; 0 = each its own)."""
    import json

    import torch

    from configs import family
    from src.training.hardware import choose_device

    if steps < 1:
        raise UsageError(f"--steps must be at least 1 (the batches each candidate cycles through), not {steps}")
    if batch < 0:
        raise UsageError(f"--batch must be 0 (each model its own) or positive, not {batch}")
    device = choose_device("auto")
    chosen = set(only.split(",")) if only else None
    rows = []
    print(f"{'config':18}{'parameters':>14}{'MACs/image':>14}{'images/s':>10}{'epoch (45k), s':>16}   batch "
          "kernels (the fastest of the candidates, as a run's trial picks)")
    for model_family, name, own_batch in CONFIGS:
        if chosen is not None and name not in chosen:
            continue
        config, batch_size = family(model_family).get(name), batch or own_batch
        parameters, macs, rate, kernels, candidates = measure(config, batch_size, steps, device)
        rows.append({"config": name, "parameters": parameters, "macs": macs, "images_per_second": rate,
                     "batch": batch_size, "epoch_seconds_45k": 45000 / rate, "kernels": kernels,
                     "candidates": candidates})
        shown = "-" if macs is None else f"{macs / 1e6:.1f}M"  # None: the model cannot run on the meta device
        print(f"{name:18}{parameters:14,}{shown:>14}{rate:10.1f}{45000 / rate:16.0f}   {batch_size:<6}{kernels}",
              flush=True)
    environment = {"device": str(device), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                   "threads": torch.get_num_threads(), "torch": torch.__version__, "steps": steps}
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps({"models": rows, "environment": environment}, indent=2) + "\n")
    print(f"saved {out} ({device}, {environment['cpu_capability']}, {environment['threads']} threads)")


if __name__ == "__main__":
    dispatch(main, description=__doc__)
