"""Muon (src/training/muon.py) against PyTorch's torch.optim.Muon where the two define the same update, on conv
filter banks, batched against per-parameter, its weight decay, norm projection and the SGD side."""
import math

import pytest
import torch

from src.training.muon import AIRBENCH_NS, HIVERGE_NS, Muon, orthogonalise


def grads(shapes, steps, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [[torch.randn(shape, generator=generator) for shape in shapes] for _ in range(steps)]


def run(optimizer, params, gradients):
    for step in gradients:
        for p, g in zip(params, step, strict=True):
            p.grad = g.clone()
        optimizer.step()


def weights(shapes, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(shape, generator=generator)) for shape in shapes]


def torch_muon(params, lr, momentum):
    """torch.optim.Muon set to our update: Nesterov, no weight decay, 3 steps, airbench's coefficients; its
    adjust_lr_fn=None scales the lr by sqrt(max(1, rows / cols)), 1 on the wide matrices used here."""
    return torch.optim.Muon(params, lr=lr, momentum=momentum, nesterov=True, weight_decay=0.0,
                            ns_coefficients=AIRBENCH_NS, ns_steps=3, adjust_lr_fn=None)


WIDE = [(8, 24), (8, 24), (16, 72)]


def test_equals_torch_muon_on_matrices_when_the_momentum_forms_scale_exactly():
    """momentum 0.5: torch's moving average is exactly half our sum, a scale the normalisation removes exactly."""
    ours, theirs = weights(WIDE), weights(WIDE)
    gradients = grads(WIDE, 5)
    run(Muon([{"params": ours, "muon": True}], lr=0.1, momentum=0.5), ours, gradients)
    run(torch_muon(theirs, 0.1, 0.5), theirs, gradients)
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_other_momenta_agree_within_bf16_rounding():
    ours, theirs = weights(WIDE), weights(WIDE)
    gradients = grads(WIDE, 5)
    run(Muon([{"params": ours, "muon": True}], lr=0.1, momentum=0.6), ours, gradients)
    run(torch_muon(theirs, 0.1, 0.6), theirs, gradients)
    for a, b in zip(ours, theirs, strict=True):
        assert (a - b).abs().max() < 0.1 * 0.05  # a few bf16 ulps of each step of size lr


def test_a_filter_bank_steps_as_torch_muon_on_its_matrix_view():
    bank = weights([(8, 3, 3, 3)])[0]
    matrix = torch.nn.Parameter(bank.detach().reshape(8, 27).clone())
    gradients = grads([(8, 3, 3, 3)], 4)
    run(Muon([{"params": [bank], "muon": True}], lr=0.05, momentum=0.5), [bank], gradients)
    run(torch_muon([matrix], 0.05, 0.5), [matrix], [[g.reshape(8, 27) for g in step] for step in gradients])
    torch.testing.assert_close(bank.detach().reshape(8, 27), matrix.detach(), rtol=0, atol=1e-6)


@pytest.mark.parametrize("coefficients", [AIRBENCH_NS, HIVERGE_NS])
def test_the_batched_iteration_equals_one_call_per_matrix(coefficients):
    stack = torch.randn(5, 16, 40, generator=torch.Generator().manual_seed(3))
    together = orthogonalise(stack, coefficients, 3, torch.float32)
    for matrix, result in zip(stack, together, strict=True):
        alone = orthogonalise(matrix[None], coefficients, 3, torch.float32)[0]
        torch.testing.assert_close(result, alone, rtol=0, atol=1e-6)


def test_the_optimizer_batches_by_shape_and_equals_the_per_parameter_path():
    shapes = [(8, 4, 3, 3), (16, 8, 3, 3), (8, 4, 3, 3), (10, 16)]
    together, apart = weights(shapes), weights(shapes)
    gradients = grads(shapes, 3)
    options = dict(lr=0.1, momentum=0.6, ns_dtype="float32")
    run(Muon([{"params": together, "muon": True}], **options), together, gradients)
    optimizers = [Muon([{"params": [p], "muon": True}], **options) for p in apart]
    for step in gradients:
        for p, g, optimizer in zip(apart, step, optimizers, strict=True):
            p.grad = g.clone()
            optimizer.step()
    for a, b in zip(together, apart, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_the_iteration_leaves_singular_values_near_one():
    matrix = torch.randn(32, 96, generator=torch.Generator().manual_seed(4))
    singular = torch.linalg.svdvals(orthogonalise(matrix[None], AIRBENCH_NS, 5, torch.float32)[0])
    assert singular.min() > 0.6 and singular.max() < 1.25  # the quintic's band, not exactly 1 (by design)
    tall = orthogonalise(matrix.T[None], AIRBENCH_NS, 5, torch.float32)[0]
    torch.testing.assert_close(tall, orthogonalise(matrix[None], AIRBENCH_NS, 5, torch.float32)[0].T)


def test_weight_decay_after_the_update_and_the_norm_projection_before_it():
    p = weights([(8, 27)])[0]
    start = p.detach().clone()
    g = torch.randn(8, 27, generator=torch.Generator().manual_seed(5))
    p.grad = g.clone()
    Muon([{"params": [p], "muon": True}], lr=0.1, momentum=0.6, weight_decay=0.01, norm_every=1,
         ns_dtype="float32").step()
    projected = start * (math.sqrt(8) / start.norm())
    direction = orthogonalise((g + 0.6 * g)[None], AIRBENCH_NS, 3, torch.float32)[0]
    torch.testing.assert_close(p.detach(), (projected - 0.1 * direction) * (1 - 0.1 * 0.01), rtol=0, atol=1e-6)


def test_the_other_groups_step_as_torch_sgd_with_nesterov():
    shapes = [(8,), (10, 4)]
    ours, theirs = weights(shapes), weights(shapes)
    gradients = grads(shapes, 4)
    run(Muon([{"params": ours, "muon": False}], lr=0.1, momentum=0.85, weight_decay=1e-3), ours, gradients)
    run(torch.optim.SGD(theirs, lr=0.1, momentum=0.85, weight_decay=1e-3, nesterov=True), theirs, gradients)
    for a, b in zip(ours, theirs, strict=True):
        assert torch.equal(a, b)


def test_its_state_dict_resumes_the_same_steps():
    shapes = [(8, 4, 3, 3), (8,)]
    first, second = weights(shapes), weights(shapes)
    gradients = grads(shapes, 6)

    def make(params):
        return Muon([{"params": params[:1], "muon": True, "norm_every": 2}, {"params": params[1:]}], lr=0.1,
                    momentum=0.6)

    run(make(first), first, gradients)
    halfway = make(second)
    run(halfway, second, gradients[:3])
    saved = halfway.state_dict()
    resumed = make(second)
    resumed.load_state_dict(saved)
    run(resumed, second, gradients[3:])
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)


# Muon end to end on the simple CNN: its filter banks and dense weights on Muon (weight-norm projection every
# second step, decoupled weight decay, bf16 iteration), its biases on SGD; killed anywhere, exact.
MUON = ["--optimizer=muon", "--muon_lr=0.05", "--muon_norm_every=2", "--muon_weight_decay=0.01", "--lr=0.02"]


def test_muon_killed_anywhere_resumes_bit_identical(data_dir, tmp_path):
    import random

    from src.runs.checkpoints import list_checkpoints, load_tensors
    from test_faults import killed_equals_uninterrupted

    run, _ = killed_equals_uninterrupted(MUON, data_dir, tmp_path, random.Random(21))
    state = load_tensors(list_checkpoints(run / "checkpoints")[0])["optimizer"]
    groups = state["param_groups"]
    assert [g["muon"] for g in groups] == [True, False] and groups[0]["norm_every"] == 2
    assert {s["step"] for s in state["state"].values() if "step" in s} == {45}  # 3 epochs of 15 steps, every bank


def test_hiverges_norm_schedule_projects_when_its_interval_has_passed():
    """cifar10_speedrun.py: at step t of T (counted from 1), project once t - (the last projection's t) reaches
    2 + int(15 t / T); the first at t = 2."""
    from src.training.optim import Clock, set_learning_rate

    bank = weights([(8, 4, 3, 3)])[0]
    optimizer = Muon([{"params": [bank], "muon": True}], lr=0.1, momentum=0.6, norm_schedule="hiverge",
                     ns_dtype="float32")
    total, projected, expected, last = 243, [], [], 0
    for t in range(1, total + 1):
        if t - last >= 2 + int(15 * t / total):
            expected.append(t)
            last = t
        set_learning_rate(optimizer, 0.1, Clock(t, total, 32))
        bank.grad = torch.randn(8, 4, 3, 3, generator=torch.Generator().manual_seed(t))
        optimizer.step()
        if optimizer.state[bank].get("last_projection") == t:
            projected.append(t)
    assert projected == expected and expected[:3] == [2, 4, 6] and len(expected) < total // 2
