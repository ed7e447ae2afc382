"""The papers' recipe knobs (issue 11): label smoothing, cutout, mixup, an EMA of the weights, gradient
clipping (warmup and multistep schedules: tests/test_optim.py). Each test fails if its knob is ignored;
exact resume with every knob on is tests/test_faults.py's kill-anywhere harness."""
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import TINY
from src.runs.checkpoints import list_checkpoints, load_tensors
from src.extensions import EMA
from src.models import Standardize
from src.training.recipe import PLAIN, Recipe, scored_labels, train_step
from src.datasets.stream import TrainStream

CPU = torch.device("cpu")


def images_and_labels(n=96, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return (torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=generator),
            torch.randint(0, 10, (n,), generator=generator))


def stream(augment=False, cutout=0, mixup=0.0, shard=(0, 1), batch_size=32, seed=7):
    return TrainStream(*images_and_labels(), batch_size, seed, augment, CPU, shard).regularise(cutout, mixup)


def batches(s, epoch=1, start_batch=0):
    return list(s.epoch(epoch, start_batch))


def logits_and_labels():
    generator = torch.Generator().manual_seed(3)
    return torch.randn(16, 10, generator=generator), torch.randint(0, 10, (16,), generator=generator)


# ------------------------------------------------------------------ label smoothing


def test_label_smoothing_changes_the_training_loss_of_a_fixed_batch():
    logits, labels = logits_and_labels()
    smoothed = Recipe(label_smoothing=0.1).loss(logits, labels)
    assert torch.equal(smoothed, F.cross_entropy(logits, labels, label_smoothing=0.1))
    assert not torch.allclose(smoothed, F.cross_entropy(logits, labels))
    assert torch.equal(PLAIN.loss(logits, labels), F.cross_entropy(logits, labels))  # off: plain, bit for bit


def test_validation_loss_stays_plain_cross_entropy():
    """Whatever the training loss, the logged validation loss is plain cross-entropy, comparable across runs."""
    from src.evaluation import validation_columns

    model = tiny_model()
    images, labels = images_and_labels(40)
    columns = validation_columns(model, images.float(), labels, CPU, "fp32", 16, prefix="ema_")
    model.eval()
    with torch.no_grad():
        expected = F.cross_entropy(model(images.float()), labels).item()
    assert columns["ema_valid_loss"] == pytest.approx(expected, rel=1e-6)
    assert validation_columns(model, images[:0], labels[:0], CPU, "fp32", 16) == {"valid_loss": None,
                                                                                   "valid_acc": None}


# ------------------------------------------------------------------ cutout


def test_cutout_sets_a_square_of_the_side_asked_to_the_mean_clipped_at_the_borders():
    plain, cut = batches(stream()), batches(stream(cutout=8))
    mean = stream().mean
    sides = []
    for (x, _), (y, _) in zip(plain, cut, strict=True):
        assert y.dtype == torch.float32
        at_mean = (y == mean).all(1)  # (n, h, w); no integer pixel equals the fractional mean
        changed = (y != x.float()).any(1)
        assert torch.equal(at_mean, changed)  # outside the square every pixel is untouched
        for square in at_mean:
            rows, cols = square.any(1).nonzero().flatten(), square.any(0).nonzero().flatten()
            assert len(rows) and len(cols) and square.sum() == len(rows) * len(cols)  # one whole rectangle
            assert rows.diff().eq(1).all() and cols.diff().eq(1).all()
            # A side shorter than 8 only where the square runs over the image's border.
            for where, size in ((rows, 32), (cols, 32)):
                assert len(where) == 8 or where[0] == 0 or where[-1] == size - 1
            sides.append((len(rows), len(cols)))
    assert sides.count((8, 8)) > len(sides) / 2
    assert min(s for pair in sides for s in pair) <= 4  # centres reach the borders (uniform over the image)


def test_cutout_is_zero_after_the_models_standardisation():
    s = stream(cutout=16)
    x, _ = batches(s)[0]
    standardize = Standardize()
    standardize.set_statistics(s.mean, s.std)
    square = (x == s.mean).all(1, keepdim=True).expand_as(x)
    assert square.any() and (standardize(x)[square] == 0).all()


def test_cutout_is_a_pure_function_of_seed_epoch_and_batch_and_leaves_crop_and_flip_alone():
    a, b = batches(stream(augment=True, cutout=8), epoch=2), batches(stream(augment=True, cutout=8), epoch=2)
    assert all(torch.equal(x, y) for (x, _), (y, _) in zip(a, b, strict=True))
    assert torch.equal(batches(stream(augment=True, cutout=8), 2, start_batch=2)[0][0], a[2][0])  # resumed
    other = batches(stream(augment=True, cutout=8), epoch=3)
    assert not torch.equal((a[0][0] == stream().mean), (other[0][0] == stream().mean))
    crop_flip = batches(stream(augment=True), epoch=2)
    for (x, _), (y, _) in zip(crop_flip, a, strict=True):
        outside = ~(y == stream().mean).all(1, keepdim=True).expand_as(y)
        assert torch.equal(x.float()[outside], y[outside])


# ------------------------------------------------------------------ mixup


def test_mixup_images_are_convex_combinations_under_one_permutation_and_lam():
    plain, mixed = batches(stream(augment=True)), batches(stream(augment=True, mixup=1.0))
    lams = []
    for (x, y), (m, labels, partner_labels, lam) in zip(plain, mixed, strict=True):
        assert isinstance(lam, float) and 0 < lam < 1  # a host float: the loss needs no device read
        assert torch.equal(labels, y)
        # Recover the permutation from the partner labels' images: every row is lam * x + (1 - lam) * x[p].
        x = x.float()
        partners = [(m[i] - lam * x[i]) / (1 - lam) for i in range(len(x))]
        found = [min(range(len(x)), key=lambda j: (x[j] - p).abs().max()) for p in partners]
        assert sorted(found) == list(range(len(x)))  # a permutation of the batch
        assert torch.equal(partner_labels, y[found])
        assert torch.allclose(m, lam * x + (1 - lam) * x[found], atol=1e-3)
        lams.append(lam)
    assert len(set(lams)) == len(lams)  # one lam per batch, drawn anew each batch


@pytest.mark.parametrize("alpha", [0.2, 1.0])
def test_mixup_lam_follows_beta_alpha_alpha(alpha):
    s = stream(mixup=alpha, batch_size=4)
    lams = np.array([batch[3] for epoch in range(1, 9) for batch in s.epoch(epoch)])  # 192 draws
    variance = 1 / (4 * (2 * alpha + 1))  # of Beta(alpha, alpha), whose mean is 1/2
    assert abs(lams.mean() - 0.5) < 4 * math.sqrt(variance / len(lams))
    assert abs(lams.var() / variance - 1) < 0.3


def test_mixup_loss_weighs_both_targets_by_lam_and_accuracy_counts_the_larger_share():
    logits, labels = logits_and_labels()
    partner = labels.roll(1)
    for smoothing in (0.0, 0.1):
        recipe = Recipe(label_smoothing=smoothing)
        expected = (0.3 * F.cross_entropy(logits, labels, label_smoothing=smoothing)
                    + 0.7 * F.cross_entropy(logits, partner, label_smoothing=smoothing))
        assert torch.equal(recipe.loss(logits, labels, partner, 0.3), expected)
    assert scored_labels((None, labels, partner, 0.3)) is partner
    assert scored_labels((None, labels, partner, 0.6)) is labels
    assert scored_labels((None, labels)) is labels


def test_mixup_and_cutout_resume_at_any_batch_and_shard_as_one_process():
    """Every rank's rows are the single process's rows: its partners are rebuilt wherever they sit."""
    whole = batches(stream(augment=True, cutout=8, mixup=1.0), epoch=4)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(
        whole[1:], batches(stream(augment=True, cutout=8, mixup=1.0), 4, start_batch=1), strict=True))
    ranks = [batches(stream(augment=True, cutout=8, mixup=1.0, shard=(r, 4)), epoch=4) for r in range(4)]
    for b, (images, labels, partner_labels, lam) in enumerate(whole):
        parts = [rank[b] for rank in ranks]
        assert torch.equal(torch.cat([p[0] for p in parts]), images)
        assert torch.equal(torch.cat([p[1] for p in parts]), labels)
        assert torch.equal(torch.cat([p[2] for p in parts]), partner_labels)
        assert all(p[3] == lam for p in parts)


# ------------------------------------------------------------------ EMA


def tiny_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(),
                               torch.nn.LazyLinear(10))


def step(model, optimizer, recipe=PLAIN):
    images, labels = images_and_labels(16, seed=int(torch.randint(0, 1000, ())))
    return train_step(model, optimizer, (images.float(), labels), CPU, "fp32", recipe)


def test_ema_starts_at_the_weights_then_follows_the_decay_formula():
    model = tiny_model()
    model(torch.zeros(1, 3, 32, 32))  # materialise the lazy layer
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    ema = EMA(model, 0.9)
    step(model, optimizer)
    ema.update()
    first = {k: v.clone() for k, v in ema.model.state_dict().items()}
    assert all(torch.equal(first[k], v) for k, v in model.state_dict().items())  # the first update copies
    step(model, optimizer)
    ema.update()
    weights, averaged = model.state_dict(), ema.model.state_dict()
    for key in ("0.weight", "3.bias", "1.running_mean", "1.running_var"):  # batch-norm statistics too
        assert not torch.equal(averaged[key], weights[key]), key
        assert torch.allclose(averaged[key], 0.9 * first[key] + 0.1 * weights[key], rtol=1e-6, atol=1e-7), key
    assert ema.n_averaged == 2


def test_ema_state_round_trips_through_a_checkpoint_and_resumes_the_count():
    model = tiny_model()
    model(torch.zeros(1, 3, 32, 32))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    ema = EMA(model, 0.99)
    for _ in range(3):
        step(model, optimizer)
        ema.update()
    saved = ema.state_dict()
    other = EMA(model, 0.99)
    other.load_state_dict(saved)
    assert other.n_averaged == 3
    step(model, optimizer)
    ema.update()
    other.update()  # averages (not copies): the count came back with the weights
    assert all(torch.equal(a, b) for a, b in zip(ema.model.state_dict().values(), other.model.state_dict().values(),
                                                 strict=True))
    assert set(saved["model"]) == set(model.state_dict())  # what the model's own load_state_dict takes


# ------------------------------------------------------------------ gradient clipping


def test_grad_clip_bounds_the_global_norm_of_the_gradients_the_step_uses():
    norms = {}
    for clip in (0.0, 0.05):
        model = tiny_model()
        model(torch.zeros(1, 3, 32, 32))
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        torch.manual_seed(1)
        step(model, optimizer, Recipe(grad_clip=clip))
        norms[clip] = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()])).item()
    assert norms[0.0] > 0.05  # the test's gradients are large enough to be clipped
    assert norms[0.05] == pytest.approx(0.05, rel=1e-4)


# ------------------------------------------------------------------ fp16: the gradient scaler (issue 13)


def fp16_step(model, optimizer, scaler, recipe=PLAIN, seed=5):
    images, labels = images_and_labels(16, seed=seed)
    return train_step(model, optimizer, (images.float() / 255, labels), CPU, "fp16", recipe, scaler)


def test_fp16_step_with_inf_gradients_is_skipped_and_its_loss_stays_finite():
    """A scale that overflows the fp16 gradients: the optimizer step is skipped (weights and momentum as they
    were), the scale is halved, and the loss the loop sees is the true one, so no divergence is reported."""
    model = tiny_model()
    model(torch.zeros(1, 3, 32, 32))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    scaler = torch.amp.GradScaler("cpu")
    fp16_step(model, optimizer, scaler)  # a normal step: momentum exists
    before = [p.detach().clone() for p in model.parameters()]
    momentum = [optimizer.state[p]["momentum_buffer"].clone() for p in model.parameters()]
    scaler.update(2.0 ** 40)
    loss, logits = fp16_step(model, optimizer, scaler, Recipe(grad_clip=1.0), seed=6)
    assert torch.isfinite(loss) and loss > 0 and logits.dtype == torch.float16
    assert all(torch.equal(b, p) for b, p in zip(before, model.parameters(), strict=True))
    assert all(torch.equal(m, optimizer.state[p]["momentum_buffer"]) for m, p in zip(momentum, model.parameters(),
                                                                                      strict=True))
    assert scaler.get_scale() == 2.0 ** 39


def test_fp16_clipping_bounds_the_unscaled_gradients():
    """Clipping must see the true gradients: unscaled first, else it would clip gradients 65536 times too big."""
    model = tiny_model()
    model(torch.zeros(1, 3, 32, 32))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu")
    fp16_step(model, optimizer, scaler, Recipe(grad_clip=0.05))
    norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()])).item()
    assert norm == pytest.approx(0.05, rel=1e-3)
    assert scaler.get_scale() == 2.0 ** 16  # the step was taken, not skipped


# ------------------------------------------------------------------ every knob reaches the run


def final_weights(run):
    return load_tensors(list_checkpoints(run / "checkpoints")[0])


@pytest.fixture(scope="module")
def plain_run(tmp_path_factory, data_dir):
    from configs.simple_cnn import simple_cnn_configs
    from src.cli import dispatch_with_overrides
    from src.scripts.train_simple_CNN import train

    path = tmp_path_factory.mktemp("plain") / "run"
    with pytest.MonkeyPatch.context() as patch, pytest.raises(SystemExit) as exit_info:
        patch.setenv("DATA_DIR", str(data_dir))
        dispatch_with_overrides(train, simple_cnn_configs, ["cifar10", str(path), *TINY, "--n_epochs=1"])
    assert exit_info.value.code == 0
    return final_weights(path)


@pytest.mark.parametrize("knob", ["--label_smoothing=0.2", "--cutout=16", "--mixup=1.0", "--grad_clip=0.01",
                                  "--warmup=1", "--lr_schedule=multistep --lr_milestones=[5]"])
def test_each_knob_changes_what_the_run_computes(train_here, plain_run, tmp_path, knob):
    run = tmp_path / "run"
    extra = ["--schedule_unit=iterations"] if "milestones" in knob else []
    result = train_here(run, *knob.split(), *extra, "--n_epochs=1")
    assert result.returncode == 0, result.stderr
    changed = final_weights(run)["model"]
    assert any(not torch.equal(changed[k], plain_run["model"][k]) for k in changed if k.endswith("weight"))


def test_ema_is_validated_checkpointed_and_chosen_as_the_best_model(train_here, tmp_path):
    run = tmp_path / "run"
    result = train_here(run, "--ema=0.8")
    assert result.returncode == 0, result.stderr
    assert "ema valid loss" in result.stdout and "best_model.pt holds the moving average" in result.stdout
    rows = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert all(row["ema_valid_acc"] is not None and row["ema_valid_loss"] > 0 for row in rows)
    contents = final_weights(run)
    assert contents["ema"]["model"].keys() == contents["model"].keys()
    assert int(contents["ema"]["n_averaged"]) == 30
    assert any(not torch.equal(contents["ema"]["model"][k], v) for k, v in contents["model"].items())
    status = json.loads((run / "status.json").read_text())
    assert status["best_valid_acc"] == max(row["ema_valid_acc"] for row in rows)  # chosen by the EMA's score
    best = load_tensors(run / "best_model.pt")
    if rows[-1]["ema_valid_acc"] > rows[0]["ema_valid_acc"]:  # then the saved best is the final EMA, exactly
        assert all(torch.equal(best[k], v) for k, v in contents["ema"]["model"].items())
    from src.analysis import load_main_loop

    loaded = load_main_loop(run)  # notebooks get the EMA's weights beside the model's
    assert all(torch.equal(loaded.ema_model.state_dict()[k], v) for k, v in contents["ema"]["model"].items())
    plain = tmp_path / "plain"
    assert train_here(plain, "--n_epochs=1").returncode == 0
    assert "ema_valid_acc" not in json.loads((plain / "log.jsonl").read_text().splitlines()[0])
    assert load_main_loop(plain).ema_model is None


def test_multistep_and_milestones_go_together():
    from configs.training import TRAINING_ROOT, recipe_problems

    assert recipe_problems(TRAINING_ROOT) == []
    assert recipe_problems({**TRAINING_ROOT, "lr_schedule": "multistep"}) == [
        "--lr_schedule=multistep needs --lr_milestones (e.g. [100,150])"]
    assert recipe_problems({**TRAINING_ROOT, "lr_milestones": [100]}) == [
        "--lr_milestones=[100] needs --lr_schedule=multistep"]
    assert recipe_problems({**TRAINING_ROOT, "lr_schedule": "multistep", "lr_milestones": [100, 150]}) == []


# ------------------------------------------------------------------ no host sync per step (CUDA only)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="synchronisations are only detectable on CUDA")
def test_the_recipe_step_never_waits_for_the_gpu():
    device = torch.device("cuda")
    images, labels = images_and_labels(256)
    s = TrainStream(images, labels, 64, 1, True, device).regularise(cutout=16, mixup=1.0)
    model = tiny_model().to(device)
    model(torch.zeros(1, 3, 32, 32, device=device))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    ema, recipe = EMA(model, 0.99), Recipe(label_smoothing=0.1, grad_clip=1.0)
    batch_iter = s.epoch(1)
    for _ in range(2):  # warm-up (first kernels, the first EMA copy) outside the check
        train_step(model, optimizer, next(batch_iter), device, "fp32", recipe)
        ema.update()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for batch in batch_iter:
            train_step(model, optimizer, batch, device, "fp32", recipe)
            ema.update()
    finally:
        torch.cuda.set_sync_debug_mode("default")
