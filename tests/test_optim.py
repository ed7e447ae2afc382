"""src.optim: optimizers and schedules by name, the schedules as pure functions of the iteration."""
import math

import pytest
import torch

from src.errors import UsageError
from src.optim import OPTIMIZERS, SCHEDULES, build_optimizer, learning_rate

CONFIG = {"lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4, "adam_beta2": 0.999, "optimizer": "sgd",
          "lr_schedule": "cosine"}


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
    with pytest.raises(UsageError, match="adamw, nesterov, sgd"):
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
        assert learning_rate({**CONFIG, "lr_schedule": "cosine"}, iteration, total) == \
            0.1 * 0.5 * (1 + math.cos(math.pi * done))
        assert learning_rate({**CONFIG, "lr_schedule": "linear"}, iteration, total) == 0.1 * (1 - done)
        assert learning_rate({**CONFIG, "lr_schedule": "constant"}, iteration, total) == 0.1


def test_schedules_start_at_lr_and_fall_towards_zero():
    for name in ("cosine", "linear"):
        values = [learning_rate({**CONFIG, "lr_schedule": name}, i, 100) for i in range(1, 101)]
        assert values[0] == 0.1 and all(a >= b for a, b in zip(values, values[1:], strict=False))
        assert 0 < values[-1] < 0.002


def test_unknown_schedule_is_a_usage_error():
    with pytest.raises(UsageError, match="constant, cosine, linear"):
        learning_rate({**CONFIG, "lr_schedule": "step"}, 1, 10)
    assert sorted(SCHEDULES) == ["constant", "cosine", "linear"]
