"""Model size (src.networks.size): parameters and MACs per image, counted by torch on a meta-device copy, without
touching the model measured."""
import pytest
import torch
from torch import nn

from configs.resnet import resnet_configs
from configs.simple_cnn import simple_cnn_configs
from src.networks.size import format_macs, macs_per_image, meta_copy, model_size
from src.models import Standardize, build_model


def test_a_small_model_is_counted_by_hand():
    model = nn.Sequential(Standardize(), nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(),
                          nn.Linear(4 * 32 * 32, 10))
    size = model_size(model)
    assert size["parameters"] == (3 * 4 * 9 + 4) + (4 * 32 * 32 * 10 + 10)
    assert size["macs_per_image"] == 32 * 32 * 4 * 3 * 9 + 4 * 32 * 32 * 10


def test_the_reference_models_match_the_readme():
    resnet20 = model_size(build_model(resnet_configs.get("resnet20")))
    assert resnet20 == {"parameters": 269_722, "macs_per_image": 40_551_040}
    assert format_macs(resnet20["macs_per_image"]) == "40.6M"
    assert format_macs(5_243_328_768) == "5,243M" and format_macs(192_672) == "0.19M"


def test_measuring_changes_nothing_of_the_model():
    torch.manual_seed(0)
    model = build_model({**simple_cnn_configs.get("cifar10"), "dropout": 0.5})
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    calls = []
    model.register_forward_hook(lambda module, inputs, output: calls.append((module, inputs[0].device.type)))
    rng = torch.get_rng_state()
    size = model_size(model)
    assert size["parameters"] == sum(p.numel() for p in model.parameters()) and size["macs_per_image"] > 0
    # no forward pass through the model itself (batch norm statistics stay); its copy ran on the meta device
    assert [device for module, device in calls if module is model] == [] and calls[0][1] == "meta"
    assert model.training and torch.equal(rng, torch.get_rng_state())
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.device.type == "cpu" for p in model.parameters())


def test_the_copy_holds_no_data():
    model = nn.Linear(1000, 1000)
    shadow = meta_copy(model)
    assert shadow.weight.device.type == "meta" and isinstance(shadow.weight, nn.Parameter)
    assert model.weight.device.type == "cpu" and shadow is not model


class NeedsValues(nn.Module):
    def forward(self, x):
        return x.float() * float(x.float().mean().item())  # reads a value: no meta run possible


def test_a_model_that_cannot_run_on_meta_still_gets_its_parameters():
    model = nn.Sequential(nn.Linear(2, 2), NeedsValues())
    assert macs_per_image(model, (2,)) is None
    assert model_size(model, (2,))["parameters"] == 6


class AssertsOnData(nn.Module):
    def forward(self, x):
        assert x.device.type != "meta", "a check of the user's own"
        return x.float()


@pytest.mark.parametrize("failing", [AssertsOnData(), nn.Sequential(nn.Linear(3, 2), nn.Unflatten(1, (5, 5)))])
def test_any_failure_on_meta_means_no_macs_not_a_failed_run(failing):
    assert macs_per_image(failing, (3,)) is None


@pytest.mark.parametrize("shape", [(3, 32, 32), (1, 28, 28)])
def test_the_image_shape_is_the_datasets(shape):
    model = nn.Sequential(nn.Flatten(), nn.Linear(shape[0] * shape[1] * shape[2], 5))
    assert macs_per_image(model, shape) == shape[0] * shape[1] * shape[2] * 5
