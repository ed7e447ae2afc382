"""Optimizers and learning-rate schedules, chosen by name from the config.

Add an optimizer with a function `(config, params) -> torch.optim.Optimizer` and one line in
OPTIMIZERS; a schedule with a function `(config, clock) -> lr` and one line in SCHEDULES, where
`clock` says where training is (`clock.done`: the fraction of training before this iteration, 0 at
the first; `clock.iteration`, `clock.total_iterations`, `clock.batches_per_epoch`). The main loop
sets every parameter group's `lr` before each step from `learning_rate`, a pure function of the
iteration, so a schedule has no state to checkpoint and resumes exactly.

A warmup (`warmup` > 0) goes in front of any schedule: the schedule keeps its own timeline over the
whole of training, and the warmup replaces its first `warmup` epochs or iterations.

A model may split its parameters into groups (`parameter_groups`): a group's `lr_scale` multiplies the
schedule's lr, and its `until_epoch` freezes it once that many epochs are done (src/fast.py uses both).
With `lookahead_every` > 0 (a key of the fast family) the optimizer also gets airbench94's Lookahead.
"""
import math
from typing import NamedTuple

import torch

from src.errors import UsageError
from src.training.muon import Muon, build_muon


def build_sgd(config, params):
    return torch.optim.SGD(params, lr=config["lr"], momentum=config["momentum"], weight_decay=config["weight_decay"])


def build_nesterov(config, params):
    return torch.optim.SGD(params, lr=config["lr"], momentum=config["momentum"], weight_decay=config["weight_decay"],
                           nesterov=True)


def build_adamw(config, params):
    """AdamW with beta1 = `momentum` (0.9 by default, Adam's own default) and decoupled weight decay."""
    return torch.optim.AdamW(params, lr=config["lr"], betas=(config["momentum"], config["adam_beta2"]),
                             weight_decay=config["weight_decay"])


OPTIMIZERS = {"sgd": build_sgd, "nesterov": build_nesterov, "adamw": build_adamw, "muon": build_muon}


def build_optimizer(config, params):
    """The optimizer `config["optimizer"]` names, with Lookahead when the config has `lookahead_every` > 0
    (only src/fast.py's family has the key)."""
    name = config["optimizer"]
    if name not in OPTIMIZERS:
        raise UsageError(f"unknown --optimizer '{name}'; use one of {', '.join(sorted(OPTIMIZERS))}")
    optimizer = OPTIMIZERS[name](config, params)
    if config.get("lookahead_every", 0) > 0:
        optimizer.lookahead = Lookahead(optimizer, config["lookahead_every"], config["lookahead_decay"])
    return optimizer


class Lookahead:
    """Lookahead (Zhang et al. 2019) as airbench94 schedules it: after every `every`-th step the slow weights
    move towards the optimizer's, slow <- slow + (1 - d) (weights - slow), with d = decay**every * (t / T)**3
    at iteration t of T (nothing early in training, most at its end), and the weights are set to them; after
    the last step of training the weights become the slow ones.

    Attached to `optimizer` as a step hook, so the optimizer stays itself (its type, its `param_groups`); the
    slow weights live in its per-parameter state ("lookahead_slow"), so its state_dict, and with it every
    checkpoint, holds them. They enter that state after the first step the optimizer takes: Adam(W) sets
    up a parameter's state only while it is empty, and would fail on a state holding only the slow copy.
    `clock` (src.training.optim.Clock) is set before each step by `set_learning_rate`; without
    one (a bare step, as bench_models.py takes) the hook does nothing. Batch norm's running statistics are
    buffers, not the optimizer's: unlike airbench, they are not averaged.
    """

    def __init__(self, optimizer, every, decay):
        self.optimizer, self.every, self.decay = optimizer, every, decay
        self.clock = None
        with torch.no_grad():  # the slow weights start as the initial ones, as airbench's
            self.initial = {p: p.detach().clone() for p in self.trained()}
        optimizer.register_step_post_hook(self.after_step)

    def trained(self):
        """The weights that can change (frozen ones never move: no slow copy for them)."""
        return [p for group in self.optimizer.param_groups for p in group["params"] if p.requires_grad]

    @torch.no_grad()
    def after_step(self, optimizer, args, kwargs):
        if self.initial:  # the first step taken (in this process): the slow weights join the optimizer's state
            for p, initial in self.initial.items():
                optimizer.state[p].setdefault("lookahead_slow", initial)  # a resumed run's are already there
            self.initial = {}
        clock = self.clock
        if clock is None:
            return
        if clock.iteration % self.every == 0:
            self.pull(self.decay**self.every * (clock.iteration / clock.total_iterations) ** 3)
        if clock.iteration == clock.total_iterations:
            self.pull(1.0)  # the result of training is the slow weights

    def pull(self, decay):
        for p in self.trained():
            slow = self.optimizer.state[p]["lookahead_slow"]
            slow.lerp_(p, 1 - decay)
            p.copy_(slow)


def parameter_groups(model, config):
    """What the optimizer is given: the model's own groups where it has them (`model.parameter_groups(config)`,
    a list of torch param-group dicts; see `set_learning_rate` for the keys read here), else its parameters."""
    if hasattr(model, "parameter_groups"):
        return model.parameter_groups(config)
    return model.parameters()


def set_learning_rate(optimizer, lr, clock):
    """Every group's lr for the iteration `clock` (a Clock) is about to run: the schedule's `lr` times the
    group's `lr_scale` (1 if absent), or 0 once the group's `until_epoch` epochs are done (a frozen group: SGD
    and AdamW then leave its weights exactly as they are), falling linearly from the lr `decay_to_zero` names
    to 0 by then where it names one; and the clock for the optimizer's Lookahead. A pure
    function of the iteration, like the schedule: exact on resume."""
    if getattr(optimizer, "lookahead", None) is not None:
        optimizer.lookahead.clock = clock
    if isinstance(optimizer, Muon):  # its hiverge norm schedule reads where training is
        optimizer.clock = clock
    for group in optimizer.param_groups:
        until = group.get("until_epoch")
        if until is not None and clock.iteration - 1 >= until * clock.batches_per_epoch:
            group["lr"] = 0.0
        elif group.get("decay_to_zero"):  # its own straight line from that lr to 0 when it freezes (airbench94_muon)
            steps = math.ceil(until * clock.batches_per_epoch)  # hiverge's 0.19 epochs of 32 batches: 7 steps
            group["lr"] = group["decay_to_zero"] * (1 - (clock.iteration - 1) / steps)
        elif "lr_scale" in group:
            group["lr"] = lr * group["lr_scale"]
        else:  # every group of every family before groups existed: the same float as before
            group["lr"] = lr


class Clock(NamedTuple):
    """Where training is when the 1-based `iteration` is about to run."""

    iteration: int
    total_iterations: int
    batches_per_epoch: int

    @property
    def done(self):
        """The fraction of training before this iteration: 0 at the first, towards 1 at the last."""
        return (self.iteration - 1) / self.total_iterations

    def iterations(self, length, unit):
        """`length` in `unit` ("epochs" or "iterations") as a whole number of iterations."""
        return length * self.batches_per_epoch if unit == "epochs" else length


# Each keeps the arithmetic of the schedules as first written, so runs resume bit for bit across versions.
def constant(config, clock):
    return config["lr"]


def cosine(config, clock):
    return config["lr"] * 0.5 * (1 + math.cos(math.pi * clock.done))


def linear(config, clock):
    return config["lr"] * (1 - clock.done)


def multistep(config, clock):
    """`lr` times `lr_decay` for every milestone passed: a milestone at epoch (or iteration) m is passed
    once m epochs (iterations) are done, as torch's MultiStepLR stepped once per epoch (iteration)."""
    unit = config["schedule_unit"]
    passed = sum(clock.iteration - 1 >= clock.iterations(m, unit) for m in config["lr_milestones"])
    return config["lr"] * config["lr_decay"] ** passed


# The triangle's shape keys, and airbench94's values of them (what the schedule uses in a family whose
# config has no such keys: only configs/fast.py defines them).
TRIANGLE = {"lr_peak": 0.23, "lr_start": 0.2, "lr_end": 0.07}


def triangle(config, clock):
    """airbench94's: a straight line from `lr_start` * lr up to lr at the fraction `lr_peak` of training, then a
    straight line down to `lr_end` * lr at its end."""
    peak, start, end = (config.get(key, default) for key, default in TRIANGLE.items())
    if clock.done < peak:
        return config["lr"] * (start + (1 - start) * clock.done / peak)
    return config["lr"] * (1 + (end - 1) * (clock.done - peak) / (1 - peak))


SCHEDULES = {"constant": constant, "cosine": cosine, "linear": linear, "multistep": multistep, "triangle": triangle}


def learning_rate(config, iteration, total_iterations, batches_per_epoch):
    """The learning rate of the 1-based `iteration` of `total_iterations`: no state, exact on resume."""
    name = config["lr_schedule"]
    if name not in SCHEDULES:
        raise UsageError(f"unknown --lr_schedule '{name}'; use one of {', '.join(sorted(SCHEDULES))}")
    schedule, clock = SCHEDULES[name], Clock(iteration, total_iterations, batches_per_epoch)
    warmup = clock.iterations(config["warmup"], config["schedule_unit"])
    if iteration - 1 >= warmup:  # always, when warmup is off
        return schedule(config, clock)
    if config["warmup_shape"] == "constant":  # He et al.'s ResNet-110: 0.01 for the first 400 iterations
        return config["warmup_lr"]
    # A straight line from warmup_lr to where the schedule is at the first iteration after the warmup.
    target = schedule(config, clock._replace(iteration=min(warmup + 1, total_iterations)))
    return config["warmup_lr"] + (target - config["warmup_lr"]) * (iteration - 1) / warmup
