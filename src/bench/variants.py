"""The default model in every precision and memory format a run's kernel trial could pick (and fp16 on CUDA),
built as the main loop builds it, for the bare-step rows of make bench and the outside check of bench_epoch.py.
"""
from src.main_loop import training_model, train_step
from src.models import build_model
from src.training.hardware import grad_scaler
from src.training.kernels import candidate_name, candidates


def bench_variants(device):
    """Every candidate a run's kernel trial times on `device` (src.training.kernels.candidates), and on CUDA
    fp16 with its scaler too (what a V100, T4 or P100 runs)."""
    pairs = candidates("auto", "auto", device)
    if device.type == "cuda" and ("fp16", "channels_last") not in pairs:
        pairs.append(("fp16", "channels_last"))
    return pairs


class Variant:
    """The model and its optimizer as the main loop builds them, in one precision and memory format."""

    def __init__(self, config, stream, device, precision, memory_format):
        self.precision, self.memory_format, self.device = precision, memory_format, device
        self.name = candidate_name(precision, memory_format)
        self.model, self.optimizer = training_model(config, build_model, stream, device, memory_format)
        self.scaler = grad_scaler(device, precision)  # fp16: the loop's scaler

    def steps(self, batches):
        """The main loop's own step (src.training.recipe.train_step) on each of `batches`."""
        for batch in batches:
            train_step(self.model, self.optimizer, batch, self.device, self.precision, scaler=self.scaler)


def all_variants(config, stream, device):
    return {candidate_name(*pair): Variant(config, stream, device, *pair) for pair in bench_variants(device)}
