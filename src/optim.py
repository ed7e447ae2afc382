"""Optimizers and learning-rate schedules, chosen by name from the config.

Add an optimizer with a function `(config, params) -> torch.optim.Optimizer` and one line in
OPTIMIZERS; a schedule with a function `(config, done) -> lr` (done: the fraction of training
before this iteration, 0 at the first) and one line in SCHEDULES. The main loop sets every
parameter group's `lr` before each step from `learning_rate`, a pure function of the iteration, so
a schedule has no state to checkpoint and resumes exactly.
"""
import math

import torch

from src.errors import UsageError


def build_sgd(config, params):
    return torch.optim.SGD(params, lr=config["lr"], momentum=config["momentum"], weight_decay=config["weight_decay"])


def build_nesterov(config, params):
    return torch.optim.SGD(params, lr=config["lr"], momentum=config["momentum"], weight_decay=config["weight_decay"],
                           nesterov=True)


def build_adamw(config, params):
    """AdamW with beta1 = `momentum` (0.9 by default, Adam's own default) and decoupled weight decay."""
    return torch.optim.AdamW(params, lr=config["lr"], betas=(config["momentum"], config["adam_beta2"]),
                             weight_decay=config["weight_decay"])


OPTIMIZERS = {"sgd": build_sgd, "nesterov": build_nesterov, "adamw": build_adamw}


def build_optimizer(config, params):
    name = config["optimizer"]
    if name not in OPTIMIZERS:
        raise UsageError(f"unknown --optimizer '{name}'; use one of {', '.join(sorted(OPTIMIZERS))}")
    return OPTIMIZERS[name](config, params)


# Each keeps the arithmetic of the schedules as first written, so runs resume bit for bit across versions.
def constant(config, done):
    return config["lr"]


def cosine(config, done):
    return config["lr"] * 0.5 * (1 + math.cos(math.pi * done))


def linear(config, done):
    return config["lr"] * (1 - done)


SCHEDULES = {"constant": constant, "cosine": cosine, "linear": linear}


def learning_rate(config, iteration, total_iterations):
    """The learning rate of the 1-based `iteration` of `total_iterations`: no state, exact on resume."""
    name = config["lr_schedule"]
    if name not in SCHEDULES:
        raise UsageError(f"unknown --lr_schedule '{name}'; use one of {', '.join(sorted(SCHEDULES))}")
    return SCHEDULES[name](config, (iteration - 1) / total_iterations)
