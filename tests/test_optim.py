"""src.training.optim: optimizers and schedules by name, the schedules as pure functions of the iteration."""
import math

import pytest
import torch

from src.errors import UsageError
from src.training.optim import (OPTIMIZERS, SCHEDULES, Clock, build_optimizer, learning_rate, parameter_groups,
                       set_learning_rate)

CONFIG = {"lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4, "adam_beta2": 0.999, "optimizer": "sgd",
          "lr_schedule": "cosine", "lr_milestones": [], "lr_decay": 0.1, "warmup": 0, "warmup_shape": "linear",
          "warmup_lr": 0.0, "schedule_unit": "epochs"}
BATCHES = 10  # batches per epoch, for the schedules whose keys are in epochs


def params():
    torch.manual_seed(0)
    return [torch.nn.Parameter(torch.randn(4, 3))]


@pytest.mark.parametrize("name, kind, nesterov", [("sgd", torch.optim.SGD, False), ("nesterov", torch.optim.SGD, True),
                                                  ("adamw", torch.optim.AdamW, None)])
def test_each_optimizer_is_built_from_the_config(name, kind, nesterov):
    optimizer = build_optimizer({**CONFIG, "optimizer": name}, params())
    assert type(optimizer) is kind
    group = optimizer.param_groups[0]
    assert group["lr"] == 0.1 and group["weight_decay"] == 5e-4
    if kind is torch.optim.SGD:
        assert group["momentum"] == 0.9 and group["nesterov"] is nesterov
    else:
        assert group["betas"] == (0.9, 0.999)


def test_nesterov_steps_differ_from_plain_momentum():
    """The knob is not ignored: after two steps on the same gradients the weights differ."""
    results = []
    for name in ("sgd", "nesterov"):
        p = params()
        optimizer = build_optimizer({**CONFIG, "optimizer": name}, p)
        for _ in range(2):
            optimizer.zero_grad()
            (p[0] ** 2).sum().backward()
            optimizer.step()
        results.append(p[0].detach().clone())
    assert not torch.equal(*results)


def test_unknown_optimizer_lists_the_registered_ones():
    with pytest.raises(UsageError, match="adamw, muon, nesterov, sgd"):
        build_optimizer({**CONFIG, "optimizer": "lion"}, params())


def test_an_optimizer_added_by_name_is_used():
    OPTIMIZERS["plain"] = lambda config, p: torch.optim.SGD(p, lr=config["lr"])
    try:
        assert type(build_optimizer({**CONFIG, "optimizer": "plain"}, params())) is torch.optim.SGD
    finally:
        del OPTIMIZERS["plain"]


def test_schedules_as_first_written_bit_for_bit():
    """The same float arithmetic as the main loop's original schedule, so old runs resume identically."""
    total = 300
    for iteration in (1, 2, 150, 299, 300):
        done = (iteration - 1) / total
        assert learning_rate({**CONFIG, "lr_schedule": "cosine"}, iteration, total, BATCHES) == \
            0.1 * 0.5 * (1 + math.cos(math.pi * done))
        assert learning_rate({**CONFIG, "lr_schedule": "linear"}, iteration, total, BATCHES) == 0.1 * (1 - done)
        assert learning_rate({**CONFIG, "lr_schedule": "constant"}, iteration, total, BATCHES) == 0.1


def test_schedules_start_at_lr_and_fall_towards_zero():
    for name in ("cosine", "linear"):
        values = [learning_rate({**CONFIG, "lr_schedule": name}, i, 100, BATCHES) for i in range(1, 101)]
        assert values[0] == 0.1 and all(a >= b for a, b in zip(values, values[1:], strict=False))
        assert 0 < values[-1] < 0.002


def test_unknown_schedule_is_a_usage_error():
    with pytest.raises(UsageError, match="constant, cosine, linear, multistep, triangle"):
        learning_rate({**CONFIG, "lr_schedule": "step"}, 1, 10, BATCHES)
    assert sorted(SCHEDULES) == ["constant", "cosine", "linear", "multistep", "triangle"]


# ------------------------------------------------------------------ multistep and warmup, in both units


def lr_at(iteration, total=1000, batches=BATCHES, **keys):
    return learning_rate({**CONFIG, **keys}, iteration, total, batches)


@pytest.mark.parametrize("unit, milestones, first_after", [("epochs", [3, 5], (31, 51)),
                                                           ("iterations", [3, 5], (4, 6))])
def test_multistep_decays_once_each_milestone_is_done(unit, milestones, first_after):
    """A milestone at m epochs (iterations) changes the lr from the first iteration after m of them are done."""
    keys = {"lr_schedule": "multistep", "lr_milestones": milestones, "lr_decay": 0.2, "schedule_unit": unit}
    one, two = first_after
    assert lr_at(1, **keys) == lr_at(one - 1, **keys) == 0.1
    assert lr_at(one, **keys) == lr_at(two - 1, **keys) == 0.1 * 0.2
    assert lr_at(two, **keys) == lr_at(1000, **keys) == 0.1 * 0.2 ** 2


def test_multistep_follows_the_batches_per_epoch():
    keys = {"lr_schedule": "multistep", "lr_milestones": [2], "schedule_unit": "epochs"}
    assert lr_at(60, batches=30, **keys) == 0.1 and lr_at(60, batches=20, **keys) == 0.1 * 0.1


@pytest.mark.parametrize("unit, length", [("epochs", 2), ("iterations", 20)])
def test_linear_warmup_ramps_to_the_schedule_then_hands_over(unit, length):
    """20 iterations of warmup (2 epochs of 10 batches, or 20 iterations): a straight line from warmup_lr
    to the schedule's value at iteration 21, which the schedule then takes over, on its own timeline."""
    keys = {"warmup": length, "schedule_unit": unit, "warmup_lr": 0.01, "lr_schedule": "cosine"}
    plain = [lr_at(i) for i in range(1, 101)]
    warm = [lr_at(i, **keys) for i in range(1, 101)]
    assert warm[0] == 0.01
    assert warm[20:] == plain[20:]  # iteration 21 on: the cosine as if there were no warmup
    steps = [b - a for a, b in zip(warm[:20], warm[1:21], strict=True)]
    assert all(abs(s - (plain[20] - 0.01) / 20) < 1e-12 for s in steps)  # one straight line into iteration 21
    assert warm[19] < plain[20] and warm[19] != plain[19]


@pytest.mark.parametrize("unit, length", [("epochs", 40), ("iterations", 400)])
def test_constant_warmup_holds_warmup_lr_as_he_et_al(unit, length):
    """ResNet-110: 0.01 for the first 400 iterations, then 0.1, divided by 10 at 32k and 48k iterations."""
    keys = {"warmup": length, "schedule_unit": unit, "warmup_shape": "constant", "warmup_lr": 0.01,
            "lr_schedule": "multistep", "lr_milestones": [3200 if unit == "epochs" else 32000,
                                                          4800 if unit == "epochs" else 48000]}
    at = {i: lr_at(i, total=64000, **keys) for i in (1, 400, 401, 32000, 32001, 48000, 48001, 64000)}
    assert at == {1: 0.01, 400: 0.01, 401: 0.1, 32000: 0.1, 32001: 0.1 * 0.1, 48000: 0.1 * 0.1,
                  48001: 0.1 * 0.1 ** 2, 64000: 0.1 * 0.1 ** 2}


def test_warmup_longer_than_training_stays_between_its_ends():
    """The ramp aims at the schedule's last value, never past the end of training (linear would go negative)."""
    values = [lr_at(i, total=50, warmup=100, schedule_unit="iterations", warmup_lr=0.02, lr_schedule="linear")
              for i in range(1, 51)]
    assert values[0] == 0.02 and all(v > 0 for v in values) and values == sorted(values, reverse=True)


# ------------------------------------------------------------------ the triangle (airbench94's) and parameter groups


def airbench94_lr(step, total, lr):
    """airbench94's get_lr (legacy/airbench94.py) times its lr, written out: `step` 0-based, as LambdaLR counts."""
    warmup_steps = int(total * 0.23)
    if step < warmup_steps:
        frac = step / warmup_steps
        return lr * (0.2 * (1 - frac) + 1.0 * frac)
    frac = (step - warmup_steps) / (total - warmup_steps)
    return lr * (1.0 * (1 - frac) + 0.07 * frac)


def test_triangle_is_airbench94s_schedule():
    """Where the peak falls on an iteration (23% of 100) it is airbench's, iteration for iteration; elsewhere
    the peak sits at 23% of training exactly, where airbench rounds it down to an iteration."""
    config = {**CONFIG, "lr_schedule": "triangle", "lr": 1.5}
    for iteration in range(1, 101):
        assert learning_rate(config, iteration, 100, BATCHES) == pytest.approx(airbench94_lr(iteration - 1, 100, 1.5))
    values = [learning_rate(config, i, 430, BATCHES) for i in range(1, 431)]
    assert values[0] == pytest.approx(0.3) and max(values) <= 1.5
    assert values[-1] == pytest.approx(airbench94_lr(429, 430, 1.5), rel=1e-3)  # 0.109: 1.5 * 0.07 a step later
    peak = values.index(max(values))
    assert peak in (98, 99) and values[:peak] == sorted(values[:peak]) and values[peak:] == sorted(values[peak:])[::-1]


def test_triangle_takes_its_shape_from_the_config():
    keys = {"lr_schedule": "triangle", "lr_peak": 0.5, "lr_start": 0.0, "lr_end": 0.5}
    assert [lr_at(i, total=4, **keys) for i in (1, 2, 3, 4)] == pytest.approx([0.0, 0.05, 0.1, 0.075])
    assert lr_at(1, total=4, lr_schedule="triangle") == pytest.approx(0.1 * 0.2)  # a family without the keys


def test_parameter_groups_come_from_the_model_when_it_has_them():
    plain = torch.nn.Linear(3, 2)
    assert list(parameter_groups(plain, CONFIG)) == list(plain.parameters())

    class Grouped(torch.nn.Linear):
        def parameter_groups(self, config):
            return [{"params": [self.weight]}, {"params": [self.bias], "lr_scale": 2.0, "until_epoch": 1}]

    optimizer = build_optimizer(CONFIG, parameter_groups(Grouped(3, 2), CONFIG))
    assert [len(g["params"]) for g in optimizer.param_groups] == [1, 1]


def test_set_learning_rate_scales_and_freezes_groups_by_the_iteration_alone():
    w, b, c = (torch.nn.Parameter(torch.zeros(1)) for _ in range(3))
    optimizer = torch.optim.SGD([{"params": [w]}, {"params": [b], "lr_scale": 64.0},
                                 {"params": [c], "until_epoch": 2}], lr=1.0)
    lr = 0.1 * (1 + math.cos(1.0))  # any float: a group without keys gets exactly it, as before groups existed
    set_learning_rate(optimizer, lr, Clock(20, 100, BATCHES))  # the last iteration of epoch 2
    assert [g["lr"] for g in optimizer.param_groups] == [lr, lr * 64.0, lr]
    set_learning_rate(optimizer, lr, Clock(21, 100, BATCHES))
    assert [g["lr"] for g in optimizer.param_groups] == [lr, lr * 64.0, 0.0]
    set_learning_rate(optimizer, lr, Clock(20, 100, BATCHES))  # a resume sets it back as it was
    assert optimizer.param_groups[2]["lr"] == lr


def airbench94_lookahead_run(steps, total, every=5, decay=0.95):
    """airbench94's loop with its LookaheadState, written out: SGD steps on a fixed quadratic; every `every` steps
    ema.lerp_(w, 1 - decay**every * (t / total)**3), w = ema; after the last step w = ema (from the start)."""
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(6))
    optimizer = torch.optim.SGD([w], lr=0.1, momentum=0.85, nesterov=True)
    ema = w.detach().clone()
    for t in range(1, steps + 1):
        optimizer.zero_grad()
        ((w - 3) ** 2).sum().backward()
        optimizer.step()
        with torch.no_grad():
            if t % every == 0:
                ema.lerp_(w, 1 - decay**every * (t / total) ** 3)
                w.copy_(ema)
            if t == total:
                w.copy_(ema)
    return w.detach()


def test_lookahead_is_airbench94s_and_its_slow_weights_are_in_the_optimizer_state():
    config = {**CONFIG, "optimizer": "nesterov", "lr": 0.1, "momentum": 0.85, "weight_decay": 0.0,
              "lookahead_every": 5, "lookahead_decay": 0.95}
    for steps, total in ((12, 12), (15, 15), (7, 12)):  # ends off and on a pull; stopped mid-way
        torch.manual_seed(0)
        w = torch.nn.Parameter(torch.randn(6))
        optimizer = build_optimizer(config, [w])
        assert type(optimizer) is torch.optim.SGD
        for t in range(1, steps + 1):
            set_learning_rate(optimizer, 0.1, Clock(t, total, 4))
            optimizer.zero_grad()
            ((w - 3) ** 2).sum().backward()
            optimizer.step()
        torch.testing.assert_close(w.detach(), airbench94_lookahead_run(steps, total), rtol=1e-6, atol=1e-6)
        slow = optimizer.state_dict()["state"][0]["lookahead_slow"]
        assert slow.shape == w.shape and "momentum_buffer" in optimizer.state_dict()["state"][0]
    plain = build_optimizer({**config, "lookahead_every": 0}, [w])
    assert getattr(plain, "lookahead", None) is None and not plain.state


def test_lookahead_leaves_frozen_weights_and_bare_steps_alone():
    frozen, trained = torch.nn.Parameter(torch.ones(2), requires_grad=False), torch.nn.Parameter(torch.ones(2))
    optimizer = build_optimizer({**CONFIG, "lookahead_every": 1, "lookahead_decay": 0.5}, [frozen, trained])
    trained.grad = torch.ones(2)
    optimizer.step()  # no clock: a bare step, as bench_models.py times
    assert frozen not in optimizer.state and torch.equal(optimizer.state[trained]["lookahead_slow"], torch.ones(2))
    assert torch.allclose(trained.detach(), torch.full((2,), 0.9 - 0.1 * 5e-4))


def test_lookahead_with_adamw_steps_and_resumes_from_its_state_dict():
    """Adam(W) sets up a parameter's state only while it is empty: the slow copy must not be there first."""
    config = {**CONFIG, "optimizer": "adamw", "lr": 0.01, "lookahead_every": 2, "lookahead_decay": 0.9}

    def run(steps, resume_at=None):
        torch.manual_seed(0)
        w = torch.nn.Parameter(torch.randn(4))
        optimizer = build_optimizer(config, [w])
        for t in range(1, steps + 1):
            if t == resume_at:  # a new process: the weights and the optimizer's state from the checkpoint
                saved_w, saved_state = w.detach().clone(), optimizer.state_dict()
                w = torch.nn.Parameter(torch.randn(4))
                optimizer = build_optimizer(config, [w])
                with torch.no_grad():
                    w.copy_(saved_w)
                optimizer.load_state_dict(saved_state)
            set_learning_rate(optimizer, 0.01, Clock(t, steps, 3))
            optimizer.zero_grad()
            ((w - 3) ** 2).sum().backward()
            optimizer.step()
        assert {"step", "exp_avg", "lookahead_slow"} <= set(optimizer.state_dict()["state"][0])
        return w.detach()

    assert torch.equal(run(9), run(9, resume_at=6))
