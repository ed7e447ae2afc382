"""Muon for convnets, as the CIFAR-10 speed records use it (KellerJordan/cifar10-airbench airbench94_muon.py,
commit 096d14d; hiverge/cifar10-speedrun cifar10_speedrun.py, commit 828bcd7): each filter bank, viewed as the
matrix (out channels, in channels x k x k), steps along its momentum orthogonalised by a Newton-Schulz
iteration; every other parameter (batch-norm and whitening biases, the head) takes SGD with Nesterov momentum,
in the same optimizer, so that one state_dict (and so every checkpoint) holds both.

PyTorch's own torch.optim.Muon takes 2-D parameters only (pytorch#166209). Where both define the same update
(2-D weights, Nesterov, no weight decay, its adjust_lr_fn=None on wide matrices, the same coefficients and
steps, bf16) they agree bit for bit when momentum is 0.5, and within bf16 rounding otherwise: its momentum
is the moving average (1 - m) g + m buf, ours the sum g + m buf as the records', the same direction once
normalised. One difference is kept on purpose: our weight decay is applied after the update (hiverge's
order), torch's before it. tests/test_muon.py checks each of these.

A group is Muon's when it has `muon=True`; its keys:
    lr, momentum, nesterov          as SGD's; the momentum buffer is the sum form buf = m buf + g
    weight_decay                    decoupled: w <- w (1 - lr wd), after the update
    ns_coefficients, ns_steps       the quintic iteration's (a, b, c) and its number of steps
    ns_dtype                        "bfloat16" (airbench's), "float16" (hiverge's) or "float32"
    norm_every                      0, or project each filter bank to Frobenius norm sqrt(out channels) every
                                    this many steps, before the update (airbench94_muon: every step)
    norm_schedule                   "fixed" (every norm_every steps) or "hiverge": at step t of T, once
                                    2 + int(15 t / T) steps have passed since the last projection (T from the
                                    Clock the main loop gives the optimizer before each step)
Banks whose matrices have one shape are orthogonalised together, in one batched call per shape (hiverge pads
all of them to one shape; batching by shape gives the same matrices without the padding).
"""
import math

import torch
from torch.optim.sgd import sgd

AIRBENCH_NS = (3.4445, -4.7750, 2.0315)  # airbench94_muon.py's (and torch.optim.Muon's default) coefficients
HIVERGE_NS = (3.4576, -4.7391, 2.0843)  # cifar10_speedrun.py's
NS_EPS = 1e-7
DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}  # hiverge's: float16


def orthogonalise(matrices, coefficients=AIRBENCH_NS, steps=3, dtype=torch.bfloat16, eps=NS_EPS):
    """The Newton-Schulz iteration of airbench94_muon on a stack of matrices (n, rows, cols), each scaled to unit
    Frobenius norm first; a tall stack is iterated transposed. Returns float32 of the same shape."""
    a, b, c = coefficients
    x = matrices.to(dtype)
    tall = x.size(-2) > x.size(-1)
    if tall:
        x = x.mT
    x = x / x.norm(dim=(-2, -1), keepdim=True).clamp(min=eps)
    for _ in range(steps):
        gram = x @ x.mT
        x = torch.baddbmm(x, torch.baddbmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return (x.mT if tall else x).float()


class Muon(torch.optim.Optimizer):
    """Muon on the groups marked `muon=True`, SGD (Nesterov) on the others; see the module's docstring."""

    def __init__(self, params, lr, momentum, nesterov=True, weight_decay=0.0, ns_coefficients=AIRBENCH_NS,
                 ns_steps=3, ns_dtype="bfloat16", norm_every=0, norm_schedule="fixed"):
        defaults = dict(lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay, muon=False,
                        ns_coefficients=tuple(ns_coefficients), ns_steps=ns_steps, ns_dtype=ns_dtype,
                        norm_every=norm_every, norm_schedule=norm_schedule)
        super().__init__(params, defaults)
        self.clock = None  # src.training.optim.Clock, set before each step by set_learning_rate

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if params:
                (self.muon_step if group["muon"] else self.sgd_step)(group, params)
        return loss

    def sgd_step(self, group, params):
        """torch's own SGD, its functional form, on this group's parameters and their buffers in our state."""
        buffers = [self.state[p].get("momentum_buffer") for p in params]
        sgd(params, [p.grad for p in params], buffers, weight_decay=group["weight_decay"],
                            momentum=group["momentum"], lr=group["lr"], dampening=0.0, nesterov=group["nesterov"],
                            maximize=False)
        for p, buffer in zip(params, buffers, strict=True):
            self.state[p]["momentum_buffer"] = buffer

    def muon_step(self, group, params):
        momentum, lr = group["momentum"], group["lr"]
        updates = []
        for p in params:
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p)
                state["step"] = 0
            buffer = state["momentum_buffer"].mul_(momentum).add_(p.grad)
            updates.append(p.grad.add(buffer, alpha=momentum) if group["nesterov"] else buffer)
            state["step"] += 1
        for p in params:
            if self.projects(group, self.state[p]):  # airbench94_muon: every step, before the update
                p.mul_(math.sqrt(p.size(0)) / p.norm())
        for p, direction in zip(params, self.orthogonalised(group, updates), strict=True):
            p.add_(direction.view_as(p).to(p.dtype), alpha=-lr)
            if group["weight_decay"]:
                p.mul_(1 - lr * group["weight_decay"])

    def projects(self, group, state):
        """Whether this step scales the bank to norm sqrt(out channels) first (see norm_every, norm_schedule)."""
        step = state["step"]
        if group["norm_schedule"] == "hiverge" and self.clock is not None:
            if step - state.get("last_projection", 0) < 2 + int(15 * step / self.clock.total_iterations):
                return False
            state["last_projection"] = step
            return True
        return bool(group["norm_every"]) and step % group["norm_every"] == 0

    @staticmethod
    def orthogonalised(group, updates):
        """Each update as a matrix (rows: its first dimension), orthogonalised; one batched call per shape."""
        matrices = [u.reshape(u.size(0), -1) for u in updates]
        by_shape = {}
        for index, matrix in enumerate(matrices):
            by_shape.setdefault(tuple(matrix.shape), []).append(index)
        results = [None] * len(matrices)
        for indices in by_shape.values():
            stacked = torch.stack([matrices[i] for i in indices])
            done = orthogonalise(stacked, group["ns_coefficients"], group["ns_steps"], DTYPES[group["ns_dtype"]])
            for i, result in zip(indices, done, strict=True):
                results[i] = result
        return results


COEFFICIENTS = {"airbench": AIRBENCH_NS, "hiverge": HIVERGE_NS}
NORM_SCHEDULES = ("fixed", "hiverge")


def muon_groups(config, params):
    """The optimizer's groups: filter banks and dense weights (2 dimensions or more) take Muon at `muon_lr`,
    the rest SGD with Nesterov momentum at `lr`. A model's own groups (`parameter_groups`) say it themselves
    with `muon` (the fast family keeps its head on SGD, as airbench94_muon does); a group without the key is
    split by that rule. Muon's lr is a `lr_scale` of the schedule's lr, so the schedule drives both."""
    groups = list(params)
    if groups and not isinstance(groups[0], dict):
        groups = [{"params": groups}]
    split = []
    for group in groups:
        if "muon" in group:
            split.append(group)
            continue
        members = list(group["params"])
        for chosen in (True, False):
            if chosen_members := [p for p in members if (p.ndim >= 2) == chosen]:
                split.append({**group, "params": chosen_members, "muon": chosen})
    muon = {"momentum": config["muon_momentum"], "weight_decay": config["muon_weight_decay"]}
    return [{**group, **muon, "lr_scale": group.get("lr_scale", 1.0) * config["muon_lr"] / config["lr"]}
            if group["muon"] else group for group in split]


def build_muon(config, params):
    return Muon(muon_groups(config, params), lr=config["lr"], momentum=config["momentum"], nesterov=True,
                weight_decay=config["weight_decay"], ns_coefficients=COEFFICIENTS[config["muon_coefficients"]],
                ns_steps=config["muon_ns_steps"], ns_dtype=config["muon_ns_dtype"],
                norm_every=config["muon_norm_every"], norm_schedule=config["muon_norm_schedule"])
