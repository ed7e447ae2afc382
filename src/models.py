"""Bricks: small reusable modules, and the simple CNN built from them.

Models take uint8 images (N, 3, 32, 32) as the archives store them: standardisation is their
first brick, with the training set's statistics saved among the weights, so a loaded model needs
nothing else to classify raw CIFAR images.
"""
import torch
from torch import nn

from src.data import n_classes
from src.fast import build_fast
from src.resnets import build_preact_resnet, build_resnet, build_wrn
from src.vgg import build_vgg


class Standardize(nn.Module):
    """uint8 or float images -> per-channel standardised float32, in the memory format the convs run fastest in."""

    def __init__(self, n_channels=3):
        super().__init__()
        self.register_buffer("mean", torch.zeros(1, n_channels, 1, 1))
        self.register_buffer("std", torch.ones(1, n_channels, 1, 1))
        self.channels_last = False

    def set_statistics(self, mean, std):
        self.mean.copy_(mean.reshape(self.mean.shape))
        self.std.copy_(std.reshape(self.std.shape))

    def forward(self, x):
        x = (x.float() - self.mean) / self.std
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x


def find_standardize(model):
    """The model's Standardize brick, wherever the family put it (found by type, not position)."""
    found = [m for m in model.modules() if isinstance(m, Standardize)]
    if len(found) != 1:
        raise ValueError(f"{type(model).__name__} must hold exactly one Standardize brick, it holds {len(found)}")
    return found[0]


class ConvBlock(nn.Sequential):
    """3x3 convolution (+ batch norm) + ReLU + 2x2 max-pool: halves the image, sets the channels."""

    def __init__(self, in_channels, out_channels, batch_norm):
        layers = [nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=not batch_norm)]
        if batch_norm:
            layers.append(nn.BatchNorm2d(out_channels))
        layers += [nn.ReLU(inplace=True), nn.MaxPool2d(2)]
        super().__init__(*layers)


class SimpleCNN(nn.Sequential):
    """`n_layers` ConvBlocks, channels doubling from `n_filters`; dropout, a dense layer, the classifier."""

    def __init__(self, n_layers, n_filters, dim_dense, n_outputs, batch_norm=True, dropout=0.0, image_size=32):
        blocks, channels = [], 3
        for i in range(n_layers):
            blocks.append(ConvBlock(channels, n_filters * 2**i, batch_norm))
            channels = n_filters * 2**i
        side = image_size // 2**n_layers
        head = [nn.Flatten()]
        if dropout > 0:
            head.append(nn.Dropout(dropout))
        head += [nn.Linear(channels * side * side, dim_dense), nn.ReLU(inplace=True), nn.Linear(dim_dense, n_outputs)]
        super().__init__(Standardize(), *blocks, *head)


def build_simple_cnn(config):
    """The simple CNN family (configs/simple_cnn.py)."""
    return SimpleCNN(
        n_layers=config["n_layers"],
        n_filters=config["n_filters"],
        dim_dense=config["dim_dense"],
        n_outputs=n_classes(config["dataset"], config["label_mode"]),
        batch_norm=config["batch_norm"],
        dropout=config["dropout"],
    )


# Model families by name: the `model` key of a config. Add one with a builder `(config) -> nn.Module`
# (taking uint8 images, with one Standardize brick) and a line here; its configs go in configs/<name>.py.
MODELS = {"simple_cnn": build_simple_cnn, "resnet": build_resnet, "wrn": build_wrn,
          "preact_resnet": build_preact_resnet, "vgg": build_vgg, "fast": build_fast}


def build_model(config):
    """The model of `config["model"]` (runs saved before the key existed are simple CNNs)."""
    name = config.get("model", "simple_cnn")
    if name not in MODELS:
        raise ValueError(f"unknown model '{name}'; registered: {', '.join(sorted(MODELS))}")
    return MODELS[name](config)
