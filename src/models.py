"""Models by name: the simple CNN (the spec's model, built from its bricks here), `MODELS` and `build_model`.

Every model family registers its builder in `MODELS` (`src.networks.registry`, a leaf); importing this
module imports `src.networks`, so the papers' networks are registered too. Models take uint8 images
(N, 3, 32, 32) and start from a `Standardize` brick (src/networks/bricks.py), found by type wherever
a family puts it (`find_standardize`).
"""
from torch import nn

import src.networks  # noqa: F401  (registers the papers' networks)
from src.data import n_classes
from src.networks.bricks import Standardize, find_standardize  # noqa: F401  (public here, as before they moved)
from src.networks.registry import MODELS, register_model


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


@register_model("simple_cnn")
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


def build_model(config):
    """The model of `config["model"]` (runs saved before the key existed are simple CNNs)."""
    name = config.get("model", "simple_cnn")
    if not isinstance(name, str) or name not in MODELS:
        raise ValueError(f"unknown model '{name}'; registered: {', '.join(sorted(MODELS))}")
    return MODELS[name](config)
