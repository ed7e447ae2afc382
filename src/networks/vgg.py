"""VGG with batch norm for CIFAR: Simonyan & Zisserman 2015's configurations A (VGG-11), B (13), D (16) and
E (19), each 3x3 convolution followed by batch norm and ReLU, five 2x2 max-pools taking 32x32 to 1x1, then
one dense layer (512 -> classes) in place of the ImageNet head's three: the CIFAR adaptation that
kuangliu/pytorch-cifar made common. Takes uint8 images (N, 3, 32, 32); one Standardize brick first.
"""
from collections import OrderedDict

from torch import nn

from src.data import n_classes
from src.networks.bricks import Standardize, classifier, he_init
from src.networks.registry import register_model

POOL = "M"
# Channels of each convolution, "M" a max-pool, for the paper's columns A, B, D, E (Table 1).
LAYERS = {
    11: (64, POOL, 128, POOL, 256, 256, POOL, 512, 512, POOL, 512, 512, POOL),
    13: (64, 64, POOL, 128, 128, POOL, 256, 256, POOL, 512, 512, POOL, 512, 512, POOL),
    16: (64, 64, POOL, 128, 128, POOL, 256, 256, 256, POOL, 512, 512, 512, POOL, 512, 512, 512, POOL),
    19: (64, 64, POOL, 128, 128, POOL, 256, 256, 256, 256, POOL, 512, 512, 512, 512, POOL, 512, 512, 512, 512, POOL),
}


def features(depth, width):
    """The convolutions and pools of VGG-`depth`, channels scaled by `width` / 64 (64: the paper's)."""
    layers, channels = [], 3
    for item in LAYERS[depth]:
        if item == POOL:
            layers.append(nn.MaxPool2d(2))
            continue
        out = item * width // 64
        # The convolutions keep their bias, as the VGG paper and the references (torchvision's vgg*_bn,
        # kuangliu/pytorch-cifar) do, though batch norm cancels it: the published parameter counts include it.
        layers += [nn.Conv2d(channels, out, 3, padding=1), nn.BatchNorm2d(out), nn.ReLU(inplace=True)]
        channels = out
    return nn.Sequential(*layers), channels


class VGG(nn.Sequential):
    """VGG-`depth`-BN for 32x32 images: the features, then (dropout and) one dense layer to the classes."""

    def __init__(self, depth, n_outputs, width=64, dropout=0.0):
        if depth not in LAYERS:
            raise ValueError(f"VGG depth must be one of {', '.join(map(str, LAYERS))}, not {depth}")
        body, channels = features(depth, width)
        # After five pools the image is 1x1: the pooling in `classifier` only flattens it.
        super().__init__(OrderedDict(inputs=Standardize(), features=body,
                                     head=classifier(channels, n_outputs, dropout)))
        # He normal, fan-out, on the convolutions, as torchvision's VGG (the paper, before batch norm,
        # drew from N(0, 0.01) and pre-trained the shallower nets to start the deeper ones).
        he_init(self, "fan_out")


@register_model("vgg")
def build_vgg(config):
    """VGG-BN for CIFAR (configs/vgg.py)."""
    return VGG(config["depth"], n_classes(config["dataset"], config["label_mode"]), config["width"], config["dropout"])


def vgg_parameters(depth, n_outputs, width=64):
    """What `VGG(depth, n_outputs, width)` holds, counted without building it (for the config's check)."""
    total, channels = 0, 3
    for item in LAYERS[depth]:
        if item != POOL:
            out = item * width // 64
            total += 9 * channels * out + 3 * out  # weights, bias, batch norm's two
            channels = out
    return total + (channels + 1) * n_outputs
