"""The bricks and the simple CNN's shape, for every depth and label set."""
import pytest
import torch
from torch import nn

from configs.simple_cnn import simple_cnn_configs
from src.models import ConvBlock, Standardize, build_simple_cnn


@pytest.mark.parametrize("n_layers", [1, 2, 3, 4, 5])
def test_channels_double_per_block_and_output_has_one_logit_per_class(n_layers):
    config = {**simple_cnn_configs.get("cifar10"), "n_layers": n_layers, "n_filters": 4, "dim_dense": 8}
    model = build_simple_cnn(config)
    blocks = [m for m in model if isinstance(m, ConvBlock)]
    assert [b[0].out_channels for b in blocks] == [4 * 2**i for i in range(n_layers)]
    side = 32 // 2**n_layers
    dense = [m for m in model if isinstance(m, nn.Linear)]
    assert dense[0].in_features == 4 * 2 ** (n_layers - 1) * side * side and dense[0].out_features == 8
    assert model(torch.zeros(2, 3, 32, 32, dtype=torch.uint8)).shape == (2, 10)


@pytest.mark.parametrize(("name", "classes"), [("cifar10", 10), ("cifar100", 100), ("cifar100_coarse", 20)])
def test_classifier_size_follows_the_dataset(name, classes):
    model = build_simple_cnn(simple_cnn_configs.get(name))
    assert model[-1].out_features == classes


def test_batch_norm_and_dropout_follow_the_config():
    on = build_simple_cnn({**simple_cnn_configs.get("cifar10"), "batch_norm": True, "dropout": 0.3})
    off = build_simple_cnn({**simple_cnn_configs.get("cifar10"), "batch_norm": False, "dropout": 0.0})
    assert any(isinstance(m, nn.BatchNorm2d) for m in on.modules())
    assert [m.p for m in on.modules() if isinstance(m, nn.Dropout)] == [0.3]
    assert not any(isinstance(m, (nn.BatchNorm2d, nn.Dropout)) for m in off.modules())
    assert all(block[0].bias is not None for block in off if isinstance(block, ConvBlock))


def test_standardize_uses_saved_statistics_and_accepts_uint8():
    brick = Standardize()
    brick.set_statistics(torch.tensor([10.0, 20.0, 30.0]), torch.tensor([2.0, 4.0, 5.0]))
    x = torch.full((1, 3, 2, 2), 30, dtype=torch.uint8)
    out = brick(x)
    assert out.dtype == torch.float32
    assert out[0, :, 0, 0].tolist() == [10.0, 2.5, 0.0]
    state = brick.state_dict()
    assert torch.equal(state["mean"].flatten(), torch.tensor([10.0, 20.0, 30.0]))
    brick.channels_last = True
    assert brick(torch.zeros(2, 3, 4, 4)).is_contiguous(memory_format=torch.channels_last)
