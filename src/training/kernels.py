"""The number format and memory format a run computes in, chosen once per run and kept for its whole life.

How each is decided, in order (`choose_kernels`):

1. An explicit `precision` (fp32 | bf16 | fp16) or `memory_format` (channels_last | contiguous) is used.
2. A resumed run reuses what it was computed in (its last session on this kind of device in meta.json, or
   the checkpoint's `kernels` entry where meta.json lost it): the format and precision change the
   rounding, so exact resume needs the same ones. A folder from code older than the
   trial resumes with what that code used (channels_last on CUDA or with bf16, else contiguous).
3. A fresh run times the candidates (`candidates`: NCHW and channels_last x every precision the
   device computes natively) on copies of its own model, at its own batch size, on its own device,
   and takes the fastest: the kernel trial, recorded in meta.json with its rates.
4. A run too short to be worth timing (the trial's minimum steps above TRIAL_SHARE of the run's
   steps: every test and the demo) takes the rule older code used, so its results stay as they were.

Why: the best format differs by machine. On a 2-core AMD EPYC with AVX2 only, channels_last fp32 is
1.14-1.35x NCHW fp32 and bf16 (emulated) is 10x slower; on AVX-512 BF16, bf16 + channels_last is
2.2x fp32 (docs/performance.md, "Memory format and precision").
"""
import contextlib
import copy
import itertools
import time
from dataclasses import dataclass, field

import torch

from src.errors import RunError
from src.training.hardware import (
    BF16_CPU_FLAGS, check_precision_runs, choose_precision, cpu_flags, cuda_has_bf16, grad_scaler,
)
from src.training.optim import build_optimizer, parameter_groups
from src.training.recipe import Recipe, train_step

MEMORY_FORMATS = ("auto", "channels_last", "contiguous")  # the config key's words
TORCH_FORMATS = {"channels_last": torch.channels_last, "contiguous": torch.contiguous_format}
# The trial's budget: after one warm-up step of each candidate, rounds of one timed step of each, interleaved,
# until TRIAL_SECONDS or TRIAL_SHARE of an epoch is spent (whichever is less), between MIN_ROUNDS and MAX_ROUNDS.
TRIAL_SECONDS = 2.5
TRIAL_SHARE = 0.02
MIN_ROUNDS, MAX_ROUNDS = 2, 10
TRIAL_BATCHES = 3  # distinct batches, cycled: one batch reused would sit in the CPU's caches


@dataclass
class Kernels:
    """What a run computes in, and how that was decided: `config`, `recorded`, `trial` or `rule`."""

    precision: str
    memory_format: str
    chosen_by: str
    trial: dict = field(default_factory=dict)  # the trial's rates and cost, when there was one

    def record(self):
        """The keys of meta.json's session for this choice."""
        return {"precision": self.precision, "memory_format": self.memory_format, "kernels_chosen_by": self.chosen_by,
                **({"kernel_trial": self.trial} if self.trial else {})}

    def describe(self):
        line = f"kernels: {self.precision}, {self.memory_format} ({self.chosen_by})"
        rates = self.trial.get("images_per_second")
        if rates:
            shown = ", ".join(f"{name} {rate:.0f}" for name, rate in rates.items())
            line += f"; images/s by candidate: {shown}; trial {self.trial['seconds']:.1f} s"
        return line


class CheckpointedKernels:
    """The checkpoint's entry `kernels`: what the run computed in, so that a resume whose meta.json was lost
    still finds it (`sessions_in_checkpoint`), and one that goes on in other kernels says so (`changed`)."""

    def __init__(self, kernels, device):
        self.now = {"device": device.type, "precision": kernels.precision, "memory_format": kernels.memory_format}
        self.loaded = None

    def state_dict(self):
        return dict(self.now)

    def load_state_dict(self, state):
        self.loaded = dict(state)

    def changed(self):
        """'was X, now Y' when the checkpoint was computed in other kernels than this session's, else None."""
        if self.loaded is None or self.loaded == self.now:
            return None
        return f"{' '.join(map(str, self.loaded.values()))} -> {' '.join(self.now.values())}"


def sessions_in_checkpoint(contents):
    """A checkpoint's `kernels` entry as a one-session history (for `choose_kernels`), [] if it has none."""
    entry = contents.get("kernels") if isinstance(contents, dict) else None
    return [entry] if isinstance(entry, dict) else []


def candidate_name(precision, memory_format):
    return f"{precision} {memory_format}"


def rule_format(device, precision):
    """The memory format older code always used: channels_last on CUDA or with bf16, else contiguous (NCHW)."""
    return "channels_last" if device.type == "cuda" or precision == "bf16" else "contiguous"


def native_precisions(device):
    """The precisions `device` computes natively, fp32 first: on CUDA fp32 and bf16 (compute capability 8+) or
    fp16 (older cards, where bf16 is emulated); on a CPU fp32, bf16 with AVX-512 BF16 or AMX, fp16 with AMX-FP16.
    Emulated ones are not tried: bf16 on an AVX2 CPU was 10x slower than fp32, too slow to even time."""
    if device.type == "cuda":
        return ["fp32", "bf16" if cuda_has_bf16(device) else "fp16"]
    flags = cpu_flags()
    return ["fp32"] + ["bf16"] * bool(flags & BF16_CPU_FLAGS) + ["fp16"] * ("amx_fp16" in flags)


def candidates(precision, memory_format, device):
    """The (precision, memory format) pairs a run may use: the config's where it says one, else every choice."""
    precisions = native_precisions(device) if precision == "auto" else [precision]
    formats = ["contiguous", "channels_last"] if memory_format == "auto" else [memory_format]
    return list(itertools.product(precisions, formats))


def choose_kernels(config, device, sessions, run_steps, time_candidates):
    """The run's Kernels. `sessions`: a resumed run's sessions from meta.json (oldest first; [] if it has none),
    None for a fresh start. `run_steps`: the steps of the whole run. `time_candidates(pairs)`: the trial's
    measurement, called only when a trial is due. An explicit precision was checked on the device already
    (src.training.hardware.check_precision)."""
    precision, memory_format = config["precision"], config["memory_format"]
    if sessions is not None:
        return reused(precision, memory_format, device, sessions)
    pairs = candidates(precision, memory_format, device)
    if len(pairs) == 1:
        return Kernels(*pairs[0], "config")
    if len(pairs) * (1 + MIN_ROUNDS) > TRIAL_SHARE * run_steps:
        return by_rule(precision, memory_format, device)
    return fastest(time_candidates(pairs))


def by_rule(precision, memory_format, device):
    precision = choose_precision(precision, device)
    return Kernels(precision, rule_format(device, precision) if memory_format == "auto" else memory_format, "rule")


def reused(precision, memory_format, device, sessions):
    """What a resumed run used in its last session on this kind of device. Where that session predates the
    trial (no `memory_format`), the format older code used with its precision; where there is none (a lost
    meta.json, a run moved from another kind of device), the rule, as older code did on every start."""
    same = [s for s in sessions if str(s.get("device", "")).split(":")[0] == device.type]
    last = same[-1] if same else {}
    was = last.get("precision")
    if precision == "auto" and was in ("fp32", "bf16", "fp16"):
        with contextlib.suppress(RunError):  # a precision this device cannot run (a card without bf16): the rule
            if was != "fp32":
                check_precision_runs(was, device)
            precision = was
    if precision == "auto":
        return by_rule(precision, memory_format, device)
    if memory_format == "auto":
        memory_format = last.get("memory_format")
        if memory_format not in TORCH_FORMATS:
            memory_format = rule_format(device, precision)
    return Kernels(precision, memory_format, "recorded" if last else "rule")


def fastest(rates):
    """The trial's Kernels from {(precision, format): images/s}: the highest rate."""
    (precision, memory_format), _ = max(rates["images_per_second"].items(), key=lambda item: item[1])
    shown = {candidate_name(*pair): round(rate, 1) for pair, rate in rates["images_per_second"].items()}
    return Kernels(precision, memory_format, "trial", {**rates, "images_per_second": shown})


class Candidate:
    """A copy of the model in one precision and memory format, with its own optimizer (and fp16's scaler)."""

    def __init__(self, model, convert, config, device, precision, memory_format):
        self.precision, self.memory_format, self.device = precision, memory_format, device
        self.model = convert(copy.deepcopy(model), memory_format)
        self.optimizer = build_optimizer(config, parameter_groups(self.model, config))
        self.scaler = grad_scaler(device, precision)
        self.recipe = Recipe.from_config(config)
        self.seconds = []

    def step(self, batch):
        """One training step, timed with the device's queue drained before and after."""
        synchronize(self.device)
        started = time.perf_counter()
        train_step(self.model, self.optimizer, batch, self.device, self.precision, self.recipe, self.scaler)
        synchronize(self.device)
        return time.perf_counter() - started

    def median(self):
        return sorted(self.seconds)[len(self.seconds) // 2]


def time_candidates(pairs, model, convert, config, batches, device, batches_per_epoch):
    """{"images_per_second": {(precision, format): rate}, "rounds", "seconds"}: each candidate's median step.

    Copies of `model` (`convert(model, memory_format)` puts one in a format) train on `batches` (the run's
    first, cycled); the run's own model, optimizer and random streams are left exactly as they were (the
    copies draw their dropout masks inside `torch.random.fork_rng`), so the run starts as it would without a
    trial. `batches_per_epoch` sizes the budget (TRIAL_SHARE of an epoch at the fastest rate measured).
    """
    started = time.perf_counter()
    devices = [device.index if device.index is not None else torch.cuda.current_device()] \
        if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        runs = [Candidate(model, convert, config, device, *pair) for pair in pairs]
        for run in runs:  # warm-up: memory allocated, kernels chosen (cuDNN's autotuner), caches filled
            run.step(batches[0])
        budget, rounds, round_time = TRIAL_SECONDS, 0, 0.0
        while rounds < MIN_ROUNDS or (rounds < MAX_ROUNDS and time.perf_counter() - started + round_time < budget):
            round_started = time.perf_counter()
            for run in rotate(runs, rounds):
                run.seconds.append(run.step(batches[rounds % len(batches)]))
            round_time = time.perf_counter() - round_started
            rounds += 1
            epoch_seconds = min(run.median() for run in runs) * batches_per_epoch
            budget = min(TRIAL_SECONDS, TRIAL_SHARE * epoch_seconds)
    rates = {(run.precision, run.memory_format): len(batches[0][1]) / run.median() for run in runs}
    return {"images_per_second": rates, "rounds": rounds, "seconds": round(time.perf_counter() - started, 2)}


def rotate(runs, shift):
    """The candidates in a different order each round, so none is always the first after a pause."""
    shift %= len(runs)
    return runs[shift:] + runs[:shift]


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
