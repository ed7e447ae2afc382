"""The fast family (src/fast.py, configs/fast.py): airbench94's net and recipe in the ordinary main loop.

Sizes, the whitening and the optimizer groups are checked without data (fast); the runs train a narrow
net on the tiny CIFAR archives: it learns, its whitening comes from the training split alone, its
whitening bias stops training when the recipe says, and a run killed mid-epoch resumes bit for bit."""
import importlib
import json

import numpy as np
import pytest
import torch
from torch import nn

from conftest import REPO, assert_identical, kill_mid_epoch
from src.runs.checkpoints import list_checkpoints, load_tensors
from configs import family
from src.config import apply_overrides
from src.networks.fast import WHITEN_EPS, FastNet, Whitening, fast_parameters
from src.models import build_model, find_standardize
from src.training.optim import Clock, build_optimizer, parameter_groups, set_learning_rate

# airbench94's make_net() (legacy/airbench94.py; airbench94_muon.py builds the same layers), built on a CPU
# and counted: sum(p.numel() for p in net.parameters()) and those with requires_grad after its freezing.
AIRBENCH94_PARAMETERS, AIRBENCH94_TRAINED = 1_972_792, 1_971_352


def fast(name="fast", **changes):
    return {**family("fast").get(name), **changes}


def n_parameters(model, trained_only=False):
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trained_only)


# ------------------------------------------------------------------ the net: no data, fast


def test_parameter_count_is_airbench94s():
    model = build_model(fast())
    assert n_parameters(model) == AIRBENCH94_PARAMETERS
    assert n_parameters(model, trained_only=True) == AIRBENCH94_TRAINED
    assert n_parameters(build_model(fast(dataset="cifar100"))) == AIRBENCH94_PARAMETERS + 90 * 256
    for widths in ([64, 256, 256], [8, 16, 16], [3, 5, 7]):
        for classes, dataset in ((10, "cifar10"), (100, "cifar100")):
            assert fast_parameters(widths, classes) == n_parameters(build_model(fast(widths=widths, dataset=dataset)))


def test_the_layers_are_airbench94s():
    model = build_model(fast())
    assert find_standardize(model) is model.inputs
    assert (model.whiten.kernel_size, model.whiten.out_channels, model.whiten.padding) == ((2, 2), 24, (0, 0))
    assert not model.whiten.weight.requires_grad and model.whiten.bias.requires_grad and not model.whiten.bias.any()
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(norms) == 6 and all(n.eps == 1e-12 and n.momentum == pytest.approx(0.4) for n in norms)
    assert all(not n.weight.requires_grad and n.bias.requires_grad for n in norms)
    convs = [m for m in model.groups.modules() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [64, 64, 256, 256, 256, 256] and all(c.bias is None for c in convs)
    first = convs[0].weight  # 24 -> 64: its first 24 filters pass their channel through (dirac)
    assert torch.equal(first[:24, :, 1, 1], torch.eye(24)) and first[:24].abs().sum() == 24
    assert sum(isinstance(m, nn.GELU) for m in model.modules()) == 7
    assert not any(isinstance(m, nn.ReLU) for m in model.modules())
    assert model.head.bias is None and model.scale.factor == pytest.approx(1 / 9)
    logits = model.eval()(torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8))
    assert logits.shape == (2, 10) and logits.isfinite().all()
    features = model.groups(model.whiten_act(model.whiten(model.inputs(torch.zeros(1, 3, 32, 32)))))
    assert features.shape[2:] == (3, 3)  # then one 3x3 max-pool: 1x1 before the dense layer


def correlated_images(n=64, seed=0):
    """Standardised-looking images with strongly correlated neighbouring pixels and channels."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.randn(n, 1, 16, 16, generator=generator).repeat_interleave(2, 2).repeat_interleave(2, 3)
    return coarse * torch.tensor([1.0, 0.8, 0.5]).view(1, 3, 1, 1) + 0.1 * torch.randn(n, 3, 32, 32,
                                                                                    generator=generator)


def test_whitening_decorrelates_the_patches_it_was_computed_from():
    """Checked against numpy's own patches: the first 12 outputs' second moments are diag(l / (l + eps)),
    l the patch eigenvalues in decreasing order; the other 12 are their negatives."""
    x = correlated_images()
    layer = Whitening()
    layer.set_from(x)
    patches = np.lib.stride_tricks.sliding_window_view(x.double().numpy(), (2, 2), axis=(2, 3))  # n c 31 31 2 2
    patches = patches.transpose(0, 2, 3, 1, 4, 5).reshape(-1, 12)
    eigenvalues = np.linalg.eigvalsh(patches.T @ patches / len(patches))[::-1]
    with torch.no_grad():
        out = nn.functional.conv2d(x.double(), layer.weight.double())  # the bias is 0
    features = out[:, :12].transpose(0, 1).reshape(12, -1)
    moments = (features @ features.T / features.shape[1]).numpy()
    np.testing.assert_allclose(moments, np.diag(eigenvalues / (eigenvalues + WHITEN_EPS)), atol=2e-4)
    assert torch.equal(layer.weight[12:], -layer.weight[:12])
    assert eigenvalues[0] / eigenvalues[-1] > 100  # the data was far from white: the test means something


def test_whitening_reads_only_the_first_whiten_images_and_is_deterministic():
    images = torch.randint(0, 256, (300, 3, 32, 32), dtype=torch.uint8)
    weights = []
    for tail in (images[200:], torch.zeros_like(images[200:])):
        torch.manual_seed(0)
        model = FastNet(10, (4, 8, 8), whiten_images=200)
        find_standardize(model).set_statistics(torch.full((3,), 120.0), torch.full((3,), 70.0))
        model.init_from_data(torch.cat([images[:200], tail]))
        weights.append(model.whiten.weight.clone())
    assert torch.equal(*weights)
    model.init_from_data(images.flip(0))
    assert not torch.equal(model.whiten.weight, weights[0])


# ------------------------------------------------------------------ the recipe: groups, schedule, configs


def test_optimizer_groups_scale_batch_norm_biases_and_freeze_the_whitening_bias_after_its_epochs():
    config = fast(widths=[4, 8, 8])
    model = build_model(config)
    optimizer = build_optimizer(config, parameter_groups(model, config))
    rest, biases, whiten = optimizer.param_groups
    assert biases["params"] == [m.bias for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert whiten["params"] == [model.whiten.bias]
    assert sum(p.numel() for g in optimizer.param_groups for p in g["params"]) == n_parameters(model)
    assert biases["weight_decay"] * biases["lr"] == pytest.approx(rest["weight_decay"] * rest["lr"])  # same decay
    batches = 5
    set_learning_rate(optimizer, 0.5, Clock(3 * batches, 100, batches))  # the last iteration of epoch 3
    assert (rest["lr"], biases["lr"], whiten["lr"]) == (0.5, 0.5 * 64, 0.5)
    set_learning_rate(optimizer, 0.5, Clock(3 * batches + 1, 100, batches))  # no Lookahead pull at 16
    assert (rest["lr"], biases["lr"], whiten["lr"]) == (0.5, 0.5 * 64, 0.0)
    before = model.whiten.bias.clone()
    for _ in range(2):  # momentum left over from the epochs it trained does not move it either
        model(torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)).sum().backward()
        optimizer.step()
    assert torch.equal(model.whiten.bias, before) and model.whiten.bias.grad is not None


def test_airbench94_muon_groups_and_learning_rates_are_its_sources():
    """airbench94_muon.py: Muon on the six conv filter banks at 0.24 (1 - step / 200); SGD on the batch-norm
    biases at 0.053 and the head at 0.67 (summed loss; x 2000 on our mean loss), each with weight decay
    2e-6 * 2000 / its lr (/ 2000), and on the whitening bias at 0.053 (1 - step / 75), frozen from step 75."""
    config = fast("airbench94_muon")
    model = build_model(config)
    assert model.head.weight.std().item() == pytest.approx(1.0) and model.scale.factor == 1 / 256
    optimizer = build_optimizer(config, parameter_groups(model, config))
    rest, banks, biases, whiten, head = optimizer.param_groups
    assert banks["muon"] and not any(g["muon"] for g in (rest, biases, whiten, head))
    assert banks["params"] == [m.weight for m in model.groups.modules() if isinstance(m, nn.Conv2d)]
    assert head["params"] == [model.head.weight] and whiten["params"] == [model.whiten.bias]
    assert not any(p.requires_grad for p in rest["params"])  # the whitening's weight and batch norm's scales
    assert (banks["momentum"], banks["weight_decay"], biases["momentum"]) == (0.6, 0.0, 0.85)
    for group, lr in ((biases, 0.053), (head, 0.67)):
        assert group["weight_decay"] * 2000 == pytest.approx(2e-6 * 2000 / lr)
    batches, total = 25, 200
    for step in (0, 74, 75, 199):
        lr = config["lr"] * (1 - step / total)  # lr_schedule=linear at the 1-based iteration step + 1
        set_learning_rate(optimizer, lr, Clock(step + 1, total, batches))
        assert banks["lr"] == pytest.approx(0.24 * (1 - step / total))
        assert biases["lr"] == pytest.approx(0.053 * 2000 * (1 - step / total))
        assert head["lr"] == pytest.approx(0.67 * 2000 * (1 - step / total))
        assert whiten["lr"] == pytest.approx(0.053 * 2000 * max(0.0, 1 - step / 75))
    unchanged = fast("airbench94")
    groups = build_optimizer(unchanged, parameter_groups(build_model(unchanged), unchanged)).param_groups
    assert len(groups) == 3 and not any("muon" in g or "decay_to_zero" in g for g in groups)  # as before


def test_speedrun_is_hiverges_record():
    """cifar10_speedrun.py (commit 828bcd7): SiLU in the groups, GELU after the whitening; batch-norm momentum
    1 - 0.5566; Muon at 0.205, momentum 0.655, weight decay 1.0418e-6 x 1536 (decoupled), fp16 iteration with its
    coefficients and norm schedule; SGD at 0.0573 (biases, whitening bias over its ceil(0.19 x 32) = 7 steps) and
    0.5415 (head), momentum 0.825, weight decay 1.0418e-6 x 1536 / lr, all on its summed loss (x 1536 here)."""
    config = fast("speedrun")
    model = build_model(config)
    assert isinstance(model.groups[0].act1, nn.SiLU) and isinstance(model.whiten_act, nn.GELU)
    assert model.groups[0].norm1.momentum == pytest.approx(0.4434) and model.whiten_images == 960
    assert (config["batch_size"], config["n_iterations"], config["label_smoothing"]) == (1536, 243, 0.09)
    assert (config["brightness"], config["contrast"]) == (0.1399, 0.1308)
    optimizer = build_optimizer(config, parameter_groups(model, config))
    rest, banks, biases, whiten, head = optimizer.param_groups
    assert (banks["momentum"], banks["weight_decay"]) == (0.655, pytest.approx(1.0418e-6 * 1536))
    assert (banks["ns_dtype"], banks["norm_schedule"], banks["ns_coefficients"]) == (
        "float16", "hiverge", (3.4576, -4.7391, 2.0843))
    for group, lr in ((biases, 0.0573), (head, 0.5415)):
        assert group["momentum"] == 0.825 and group["weight_decay"] * 1536 == pytest.approx(1.0418e-6 * 1536 / lr)
    batches, total = 32, 243
    for step in (0, 6, 7, 242):
        set_learning_rate(optimizer, config["lr"] * (1 - step / total), Clock(step + 1, total, batches))
        assert banks["lr"] == pytest.approx(0.205 * (1 - step / total))
        assert head["lr"] == pytest.approx(0.5415 * 1536 * (1 - step / total))
        assert whiten["lr"] == pytest.approx(0.0573 * 1536 * max(0.0, 1 - step / 7))  # trained 7 steps


def test_the_recipe_steps_are_airbench94s():
    """airbench94 sums the loss and writes lr and weight decay per 1024 examples; our mean-loss lr 1.5 and
    weight decay 0.0153 / 11.5 take the same steps."""
    config = fast()
    kilostep = 1024 * (1 + 1 / (1 - 0.85))
    lr_sum = 11.5 / kilostep
    decay_sum = 0.0153 * 1024 / kilostep / lr_sum
    assert config["lr"] == pytest.approx(lr_sum * 1024) and config["weight_decay"] == pytest.approx(decay_sum / 1024)
    assert (config["optimizer"], config["momentum"], config["batch_size"], config["label_smoothing"],
            config["lr_schedule"], config["n_epochs"]) == ("nesterov", 0.85, 1024, 0.2, "triangle", 10)
    weights = []
    ours, airbench = (config["lr"], config["weight_decay"], torch.mean), (lr_sum, decay_sum, torch.sum)
    for lr, weight_decay, reduce in (ours, airbench):
        torch.manual_seed(0)
        w = nn.Parameter(torch.randn(8))
        optimizer = torch.optim.SGD([w], lr=lr, momentum=0.85, nesterov=True, weight_decay=weight_decay)
        for step in range(3):
            x = torch.randn(1024, 8, generator=torch.Generator().manual_seed(step))
            optimizer.zero_grad()
            reduce((x @ w - 1) ** 2).backward()
            optimizer.step()
        weights.append(w.detach())
    torch.testing.assert_close(*weights)
    assert fast("airbench94")["valid_size"] == 0 and fast()["valid_size"] == 5000
    assert (config["lookahead_every"], config["lookahead_decay"]) == (5, 0.95)


def test_named_configs_are_valid():
    registry = family("fast")
    for name in registry.names():
        assert registry.problems(registry.get(name)) == [], name
    assert {"fast", "airbench94", "airbench94_muon", "speedrun"} <= set(registry.names())


@pytest.mark.parametrize(("overrides", "says"), [
    ({"widths": "[64,256]"}, "--widths must be 3 positive integers"),
    ({"widths": "[64,0,256]"}, "--widths must be 3 positive integers"),
    ({"widths": "[64,256,2.5]"}, "--widths must be 3 positive integers"),
    ({"widths": "[64,100000,100000]"}, "--widths=[64, 100000, 100000] gives a model of 2.7e+11 parameters"),
    ({"bn_momentum": "1.5"}, "--bn_momentum must be in (0, 1]"),
    ({"bn_momentum": "0"}, "--bn_momentum must be in (0, 1]: 0 never updates the running statistics"),
    ({"whiten_images": "0"}, "--whiten_images must be at least 1"),
    ({"whiten_bias_epochs": "-1"}, "--whiten_bias_epochs must not be negative"),
    ({"bias_lr_scale": "0"}, "--bias_lr_scale must be positive"),
    ({"logit_scale": "-1"}, "--logit_scale must be positive"),
    ({"lr_peak": "1"}, "--lr_peak must be in [0, 1)"),
    ({"lr_end": "-0.1"}, "--lr_end must not be negative"),
    ({"lookahead_every": "-5"}, "--lookahead_every must not be negative"),
    ({"lookahead_decay": "1.5"}, "--lookahead_decay must be in [0, 1]"),
    ({"head_init": "zeros"}, "--head_init must be one of default, unit_std"),
    ({"head_lr_scale": "-1"}, "--head_lr_scale must not be negative"),
    ({"whiten_bias_decay": "cosine"}, "--whiten_bias_decay must be one of schedule, linear"),
    ({"activation": "relu"}, "--activation must be one of gelu, silu"),
    ({"model": "vgg"}, "--model is the family of this runner's configs, fast"),
])
def test_bad_values_are_refused_in_one_line(overrides, says):
    registry = family("fast")
    problems = registry.problems(apply_overrides(registry.get("fast"), overrides))
    assert len(problems) == 1 and problems[0].startswith(says), problems


# ------------------------------------------------------------------ end to end, on the tiny archives

NARROW = ["--widths=[8,16,16]", "--tensorboard=false", "--checkpoint_every_seconds=0"]


@pytest.fixture
def train_fast(data_dir, monkeypatch, capsys):
    """train_fast(save_path, *overrides): the runner on the `fast` config, narrow, in this process on one thread
    (as the scripts run in tests); -> what it printed."""
    monkeypatch.setenv("DATA_DIR", str(data_dir))
    runner = importlib.import_module("src.scripts.train_fast")

    def run(save_path, *overrides):
        from src.cli import dispatch_with_overrides

        capsys.readouterr()
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            with pytest.raises(SystemExit) as exit_info:
                dispatch_with_overrides(runner.train, family("fast"), ["fast", str(save_path), *NARROW, *overrides])
        finally:
            torch.set_num_threads(threads)
        out, err = capsys.readouterr()
        assert exit_info.value.code == 0, err
        return out

    return run


def test_it_learns_on_demo_data_and_its_run_is_read_by_the_tools(train_fast, evaluate_here, tmp_path):
    from src.analysis import load_main_loop

    run = tmp_path / "run"
    train_fast(run, "--batch_size=64", "--valid_size=100", "--n_epochs=4")
    loaded = load_main_loop(run)
    assert loaded.config["model"] == "fast" and loaded.status["finished"]
    assert loaded.log["valid_acc"].iloc[-1] > 0.35  # 10 classes: chance is 0.1 (0.59 when written)
    assert evaluate_here(run).returncode == 0


def test_the_whitening_comes_from_the_training_split_and_its_bias_stops_after_its_epochs(train_fast, data_dir,
                                                                                         tmp_path):
    from src.data import channel_mean_std, load_cifar, split_train_valid

    run = tmp_path / "run"
    # Lookahead off: its pulls would move the frozen bias towards its slow copy, as airbench's do.
    train_fast(run, "--batch_size=50", "--valid_size=100", "--n_epochs=2", "--whiten_bias_epochs=1",
               "--whiten_images=300", "--lookahead_every=0")
    (x, _), _ = load_cifar("cifar10", data_dir)
    train, _ = split_train_valid(len(x), 100, -1, seed=1)
    images = torch.from_numpy(x[np.sort(train)])
    torch.manual_seed(0)
    expected = FastNet(10, (8, 16, 16), whiten_images=300)
    find_standardize(expected).set_statistics(*channel_mean_std(images))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the run computed it
    try:
        expected.init_from_data(images)
    finally:
        torch.set_num_threads(threads)
    epoch_ends = [load_tensors(path)["model"] for path in list_checkpoints(run / "checkpoints")]
    assert len(epoch_ends) == 2  # after epoch 2 and after epoch 1
    for weights in epoch_ends:
        assert torch.equal(weights["whiten.weight"], expected.whiten.weight)
    assert torch.equal(epoch_ends[0]["whiten.bias"], epoch_ends[1]["whiten.bias"])  # frozen in epoch 2
    assert epoch_ends[1]["whiten.bias"].any()  # trained in epoch 1
    assert not torch.equal(epoch_ends[0]["head.weight"], epoch_ends[1]["head.weight"])


@pytest.mark.parametrize(("augmentation", "saved_as"), [
    ([], {"crop_padding": 2, "crop_padding_mode": "reflect", "flip": "alternate"}),
    (["--crop_padding=5", "--flip=none"], {"crop_padding": 5, "crop_padding_mode": "reflect", "flip": "none"}),
    # speedrun's knobs (issue 21): Muon with hiverge's schedule, fp16 iteration and decoupled decay, the head on
    # its own group, colour jitter, SiLU, the whitening bias's own line, and a budget ending mid-way in epoch 2.
    (["--optimizer=muon", "--muon_norm_schedule=hiverge", "--muon_ns_dtype=float16", "--muon_coefficients=hiverge",
      "--muon_weight_decay=0.0016", "--head_lr_scale=9.45", "--head_init=unit_std", "--brightness=0.14",
      "--contrast=0.13", "--activation=silu", "--whiten_bias_decay=linear", "--lr_schedule=linear",
      "--lookahead_every=0", "--n_iterations=25"],
     {"optimizer": "muon", "n_iterations": 25, "activation": "silu", "muon_norm_schedule": "hiverge"}),
], ids=["airbench94s", "reflect-5-no-flip", "speedrun-knobs"])
def test_a_fast_run_killed_mid_epoch_resumes_bit_identically(train_fast, data_dir, tmp_path, augmentation, saved_as):
    # 15 batches an epoch (what wait_for_mid_epoch_checkpoint counts in), a checkpoint every 4; the whitening
    # bias freezes at the start of epoch 2, after the kill or before it. The `fast` config's augmentation (2-pixel
    # reflect padding, alternate flip: epoch 2 flips exactly the images epoch 1 did not) resumes bit for bit,
    # and so do other values of its keys.
    args = [*NARROW, "--n_examples=150", "--batch_size=10", "--valid_size=50", "--n_epochs=2",
            "--checkpoint_every_n_batches=4", "--whiten_bias_epochs=1", *augmentation]
    killed = tmp_path / "killed"
    kill_mid_epoch(REPO / "src" / "scripts" / "train_fast.py", "fast", killed, *args, data_dir=data_dir)
    assert "resuming from" in train_fast(killed, *args)  # one thread, as the killed process
    train_fast(tmp_path / "straight", *args)
    assert_identical(tmp_path / "straight", killed)
    saved = json.loads((killed / "config.json").read_text())
    assert {key: saved[key] for key in saved_as} == saved_as
