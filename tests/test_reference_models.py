"""The reference CIFAR models (src/networks/resnet.py, wrn.py, preact_resnet.py, vgg.py): their published sizes,
the parts the papers specify, their configs' checks, and each family's runner end to end: it learns, resumes
exactly (also after a kill mid-epoch), and its run is read by load_main_loop, evaluate.py and load_runs.

The published-size models are built only in the parameter counts; the runs train tiny ones of each family
(same code path, a few channels)."""
import contextlib
import importlib
import json

import pytest
import torch
from torch import nn

from conftest import REPO, assert_identical, kill_mid_epoch
from configs import family
from src.config import apply_overrides
from src.models import build_model, find_standardize
from src.networks.bricks import PreActBlock
from src.networks.preact_resnet import PreActResNet18, preact_resnet18_parameters
from src.networks.resnet import BasicBlock, ResNet, resnet_parameters
from src.networks.wrn import WideResNet, wrn_parameters
from src.networks.vgg import VGG, vgg_parameters


def n_parameters(model):
    return sum(p.numel() for p in model.parameters())


def named(name, **changes):
    """A registered config of whichever family has it, with `changes`."""
    registry = next(r for r in (family(m) for m in ("resnet", "wrn", "preact_resnet", "vgg")) if name in r.names())
    return {**registry.get(name), **changes}


# ------------------------------------------------------------------ sizes: no data, fast


@pytest.mark.parametrize(("name", "changes", "expected"), [
    # He et al. 2016, Table 6: 0.27M, 0.46M, 0.66M, 0.85M, 1.7M; exactly these with option A shortcuts.
    ("resnet20", {}, 269_722),
    ("resnet32", {}, 464_154),
    ("resnet44", {}, 658_586),
    ("resnet56", {}, 853_018),
    ("resnet110", {}, 1_727_962),
    ("resnet20", {"shortcut": "B"}, 269_722 + 2_752),  # two 1x1 projections with batch norm: 16->32, 32->64
    ("resnet20", {"dataset": "cifar100"}, 269_722 + 90 * 65),
    # Zagoruyko & Komodakis 2016, Table 4/5: WRN-16-4 2.7M, WRN-28-10 36.5M; the authors' code and
    # xternalz/WideResNet-pytorch give 36,479,194 for WRN-28-10 on CIFAR-10.
    ("wrn_16_4", {}, 2_748_890),
    ("wrn_16_4_cifar100", {}, 2_748_890 + 90 * 257),
    ("wrn_28_10", {}, 36_479_194),
    ("wrn_28_10_cifar100", {}, 36_479_194 + 90 * 641),
    # "about 11.2M": kuangliu/pytorch-cifar's PreActResNet18 has 11,171,146; He et al.'s BN-ReLU after the
    # last unit adds 1,024 (the stem's activation replaces the first unit's own: no change in count).
    ("preact_resnet18", {}, 11_171_146 + 1_024),
    ("preact_resnet18", {"dataset": "cifar100"}, 11_172_170 + 90 * 513),
    # kuangliu/pytorch-cifar's VGG('VGG11') and VGG('VGG16') (batch norm, one 512 -> 10 dense layer).
    ("vgg11_bn", {}, 9_231_114),
    ("vgg16_bn", {}, 14_728_266),
    ("vgg16_bn", {"dataset": "cifar100"}, 14_728_266 + 90 * 513),
])
def test_parameter_counts_are_the_published_ones(name, changes, expected):
    config = named(name, **changes)
    model = build_model(config)
    assert n_parameters(model) == expected
    classes = 100 if config["dataset"] == "cifar100" else 10
    assert [m.out_features for m in model.modules() if isinstance(m, nn.Linear)] == [classes]


def test_sizes_counted_from_the_numbers_alone_are_the_built_models():
    """The configs' checks count without building (configs/*.py); the counts must be the models'."""
    for depth in (8, 20, 26):
        for shortcut in "AB":
            assert resnet_parameters(depth, 20, shortcut) == n_parameters(ResNet(depth, 20, shortcut))
    for depth, k in ((10, 1), (10, 3), (16, 2), (22, 1)):
        assert wrn_parameters(depth, k, 10) == n_parameters(WideResNet(depth, k, 10))
    for width in (1, 3, 8):
        assert preact_resnet18_parameters(100, width) == n_parameters(PreActResNet18(100, width))
    for depth in (11, 13, 16, 19):
        for width in (1, 4):
            assert vgg_parameters(depth, 10, width) == n_parameters(VGG(depth, 10, width))


# ------------------------------------------------------------------ what the papers specify


def test_option_a_shortcut_subsamples_and_zero_pads_with_no_parameters():
    block = BasicBlock(16, 32, stride=2, shortcut="A")
    assert n_parameters(block.shortcut) == 0
    x = torch.randn(2, 16, 8, 8)
    out = block.shortcut(x)
    assert out.shape == (2, 32, 4, 4)
    assert torch.equal(out[:, :16], x[:, :, ::2, ::2]) and not out[:, 16:].any()
    kernels = {m.kernel_size for m in ResNet(20, 10, "A").modules() if isinstance(m, nn.Conv2d)}
    assert kernels == {(3, 3)}  # option A: no projection anywhere
    assert sum(m.kernel_size == (1, 1) for m in ResNet(20, 10, "B").modules() if isinstance(m, nn.Conv2d)) == 2


def test_dropout_sits_where_the_papers_put_it_and_wide_blocks_project_the_activated_input():
    model = WideResNet(16, 2, 10, dropout=0.3)
    blocks = [m for m in model.modules() if isinstance(m, PreActBlock)]
    assert len(blocks) == 6 and all(isinstance(b.dropout, nn.Dropout) and b.dropout.p == 0.3 for b in blocks)
    assert not any(isinstance(m, nn.Dropout) for m in WideResNet(16, 2, 10).modules())
    assert [type(m) for m in VGG(11, 10, 2, dropout=0.5).head][-2:] == [nn.Dropout, nn.Linear]  # before the dense layer
    block = PreActBlock(4, 8, stride=2).eval()
    x = torch.randn(2, 4, 8, 8)
    residual = block.conv2(torch.relu(block.bn2(block.conv1(torch.relu(block.bn1(x))))))
    assert torch.allclose(block(x), residual + block.projection(torch.relu(block.bn1(x))))


def test_convolutions_start_from_he_initialisation_with_each_papers_fan():
    """ResNet: fan-in (He et al. 2015's forward derivation, which the paper cites); WRN: fan-out (the
    authors' code). A 16 -> 64 convolution tells them apart: std sqrt(2 / 144) against sqrt(2 / 576)."""
    resnet_conv = ResNet(56, 10).blocks[-1].conv1  # 64 -> 64
    assert resnet_conv.weight.std().item() == pytest.approx((2 / (64 * 9)) ** 0.5, rel=0.03)
    wrn_conv = WideResNet(16, 4, 10).blocks[0].conv1  # 16 -> 64
    assert wrn_conv.weight.std().item() == pytest.approx((2 / (64 * 9)) ** 0.5, rel=0.03)


@pytest.mark.parametrize("config", [
    named("resnet20", depth=8), named("wrn_16_4", depth=10, widen_factor=1, dataset="cifar100"),
    named("preact_resnet18", width=2, label_mode="coarse", dataset="cifar100"), named("vgg11_bn", width=2),
], ids=["resnet", "wrn", "preact_resnet", "vgg"])
def test_every_family_classifies_uint8_images_through_one_standardize_brick(config):
    model = build_model(config).eval()
    assert find_standardize(model) is model.inputs  # the first child; the main loop finds it by type
    classes = {"cifar10": 10, "cifar100": 100}[config["dataset"]] if config["label_mode"] == "fine" else 20
    logits = model(torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8))
    assert logits.shape == (2, classes) and logits.isfinite().all()


# ------------------------------------------------------------------ configs: the recipes and the checks


def test_named_configs_are_valid_and_carry_their_papers_recipes():
    for model in ("resnet", "wrn", "preact_resnet", "vgg"):
        registry = family(model)
        for name in registry.names():
            assert registry.problems(registry.get(name)) == [], name
    he = named("resnet56")
    assert (he["lr"], he["weight_decay"], he["lr_milestones"], he["schedule_unit"]) == (0.1, 1e-4, [32000, 48000],
                                                                                         "iterations")
    assert he["n_epochs"] * ((50_000 - he["valid_size"]) // he["batch_size"]) == 63_882  # the paper's 64k
    warm = named("resnet110")
    assert (warm["warmup"], warm["warmup_shape"], warm["warmup_lr"]) == (400, "constant", 0.01)
    assert named("resnet56")["warmup"] == 0
    wide = named("wrn_28_10_cifar100")
    assert (wide["optimizer"], wide["lr_milestones"], wide["lr_decay"], wide["n_epochs"], wide["dropout"],
            wide["weight_decay"], wide["dataset"]) == ("nesterov", [60, 120, 160], 0.2, 200, 0.3, 5e-4, "cifar100")
    for name in ("preact_resnet18", "vgg11_bn", "vgg16_bn"):
        assert (named(name)["lr_schedule"], named(name)["n_epochs"], named(name)["lr"]) == ("cosine", 200, 0.1)


@pytest.mark.parametrize(("model", "overrides", "says"), [
    ("resnet", {"depth": "21"}, "--depth must be 6n + 2"),
    ("resnet", {"depth": "2"}, "--depth must be 6n + 2"),
    ("resnet", {"shortcut": "C"}, "--shortcut must be A"),
    ("resnet", {"depth": str(6 * 10**8 + 2)}, "--depth=600000002 gives a model of 9.72e+12 parameters"),
    ("resnet", {"model": "vgg"}, "--model is the family of this runner's configs, resnet"),
    ("wrn", {"depth": "28", "widen_factor": "0"}, "--widen_factor must be at least 1"),
    ("wrn", {"depth": "26"}, "--depth must be 6n + 4"),
    ("wrn", {"widen_factor": "100"}, "--depth=28, --widen_factor=100 give a model of 3.64e+09 parameters"),
    ("wrn", {"dropout": "1"}, "--dropout must be in [0, 1)"),
    ("preact_resnet", {"width": "0"}, "--width must be at least 1"),
    ("preact_resnet", {"width": "1000"}, "--width=1000 gives a model of 2.72e+09 parameters"),
    ("vgg", {"depth": "12"}, "--depth must be one of 11, 13, 16, 19"),
    ("vgg", {"width": "1000"}, "--depth=16, --width=1000 give a model of 3.59e+09 parameters"),
])
def test_bad_family_values_are_refused_in_one_line_before_anything_is_built(model, overrides, says):
    registry = family(model)
    problems = registry.problems(apply_overrides(registry.root, overrides))
    assert len(problems) == 1 and problems[0].startswith(says), problems


# ------------------------------------------------------------------ end to end: each family's runner

FAMILY_RUNS = {  # a tiny model of each family, by its named config: the code path of the published ones
    "resnet": ("resnet20", "--depth=8"),
    "wrn": ("wrn_16_4", "--depth=10", "--widen_factor=1"),  # dropout 0.3: exact resume needs the re-seeding
    "preact_resnet": ("preact_resnet18", "--width=4"),
    "vgg": ("vgg11_bn", "--width=8"),
}
QUIET = ["--tensorboard=false", "--checkpoint_every_seconds=0"]
# 64 images in 2 batches an epoch, checkpointed after each batch: cheap, and resumes land mid-epoch too.
SMALL = ["--n_examples=64", "--batch_size=32", "--valid_size=32", "--checkpoint_every_n_batches=1"]


@contextlib.contextmanager
def one_thread():
    """As the scripts run in tests (OMP_NUM_THREADS=1): bit-identical results need the same thread count, and
    one thread is also the fast choice for these tiny models on a shared machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture
def train_family(data_dir, monkeypatch, capsys):
    """train_family(model, save_path, *overrides): the family's runner, in this process on one thread, on its
    tiny config; -> what it printed."""
    monkeypatch.setenv("DATA_DIR", str(data_dir))

    def run(model, save_path, *overrides):
        from src.cli import dispatch_with_overrides

        runner = importlib.import_module(f"src.scripts.train_{model}")
        config, *tiny = FAMILY_RUNS[model]
        capsys.readouterr()
        with pytest.raises(SystemExit) as exit_info, one_thread():
            dispatch_with_overrides(runner.train, family(model), [config, str(save_path), *tiny, *QUIET, *overrides])
        out, err = capsys.readouterr()
        assert exit_info.value.code == 0, err
        return out

    return run


@pytest.mark.parametrize("model", FAMILY_RUNS)
def test_each_family_learns_and_its_run_is_read_by_every_tool(model, train_family, evaluate_here, tmp_path):
    from src.analysis import load_main_loop, load_runs

    run = tmp_path / "runs" / model
    train_family(model, run, "--batch_size=32", "--valid_size=100", "--n_epochs=4")
    loaded = load_main_loop(run)
    assert loaded.config["model"] == model and loaded.status["finished"]
    assert type(loaded.model) is type(build_model(loaded.config))
    assert loaded.log["valid_acc"].iloc[-1] > 0.25  # 10 classes: chance is 0.1
    result = evaluate_here(run)
    assert result.returncode == 0, result.stderr
    assert json.loads((run / "eval_test.json").read_text())["n_test"] == 100
    table = load_runs(tmp_path / "runs")
    assert list(table["model"]) == [model] and table["state"][0] == "finished"


@pytest.mark.parametrize("model", FAMILY_RUNS)
def test_each_family_resumes_bit_identically(model, train_family, tmp_path):
    # Stopped after epoch 1 by its n_epochs, then raised to 2: the same run as 2 straight only under a learning
    # rate that does not depend on the run's length (cosine would stretch; the papers' steps come later).
    small = [*SMALL, "--lr_schedule=constant", "--lr_milestones=[]"]
    train_family(model, tmp_path / "straight", *small, "--n_epochs=2")
    train_family(model, tmp_path / "resumed", *small, "--n_epochs=1")
    assert "resuming from" in train_family(model, tmp_path / "resumed", *small, "--n_epochs=2")
    assert_identical(tmp_path / "straight", tmp_path / "resumed")


def test_a_resnet_killed_mid_epoch_resumes_bit_identically(train_family, data_dir, tmp_path):
    # 15 batches an epoch (what wait_for_mid_epoch_checkpoint counts in), a checkpoint every 4.
    args = [*FAMILY_RUNS["resnet"][1:], *QUIET, "--n_examples=150", "--batch_size=10", "--valid_size=50",
            "--n_epochs=2", "--checkpoint_every_n_batches=4"]
    killed = tmp_path / "killed"
    kill_mid_epoch(REPO / "src" / "scripts" / "train_resnet.py", "resnet20", killed, *args, data_dir=data_dir)
    assert "resuming from" in train_family("resnet", killed, *args)  # one thread, as the killed process
    train_family("resnet", tmp_path / "straight", *args)
    assert_identical(tmp_path / "straight", killed)
