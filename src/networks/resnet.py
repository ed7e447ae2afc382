"""ResNet-(6n+2) of He et al. 2016, "Deep Residual Learning for Image Recognition", Sec. 4.2: a 3x3
convolution, three stages of n basic blocks at 16, 32 and 64 channels (the second and third start with
stride 2), global average pooling and the classifier. Takes uint8 images (N, 3, 32, 32); one Standardize
brick first.
"""
from collections import OrderedDict

import torch.nn.functional as F
from torch import nn

from src.data import n_classes
from src.networks.bricks import Standardize, classifier, conv3x3, he_init, stage_parameters, stages
from src.networks.registry import register_model


class SubsampleAndPad(nn.Module):
    """He et al.'s shortcut option A: the identity, subsampled by `stride` and with `extra_channels` zero
    channels appended ("extra zero entries padded for increasing dimensions"); it has no parameters."""

    def __init__(self, extra_channels, stride):
        super().__init__()
        self.extra_channels, self.stride = extra_channels, stride

    def forward(self, x):
        return F.pad(x[:, :, ::self.stride, ::self.stride], (0, 0, 0, 0, 0, self.extra_channels))


def projection(in_channels, out_channels, stride):
    """Shortcut option B: a strided 1x1 convolution and batch norm, where the shape changes."""
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                         nn.BatchNorm2d(out_channels))


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN, plus the shortcut, then ReLU (the post-activation block)."""

    def __init__(self, in_channels, out_channels, stride, shortcut):
        super().__init__()
        self.conv1, self.bn1 = conv3x3(in_channels, out_channels, stride), nn.BatchNorm2d(out_channels)
        self.conv2, self.bn2 = conv3x3(out_channels, out_channels), nn.BatchNorm2d(out_channels)
        if stride == 1 and in_channels == out_channels:
            self.shortcut = nn.Identity()
        elif shortcut == "A":
            self.shortcut = SubsampleAndPad(out_channels - in_channels, stride)
        else:
            self.shortcut = projection(in_channels, out_channels, stride)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet(nn.Sequential):
    """ResNet-`depth` (depth = 6n + 2) for 32x32 images, shortcut option "A" (zero padding, the paper's
    CIFAR choice) or "B" (projections where the shape changes)."""

    def __init__(self, depth, n_outputs, shortcut="A"):
        if depth < 8 or (depth - 2) % 6:
            raise ValueError(f"a CIFAR ResNet has depth 6n + 2 (n >= 1), not {depth}")
        stem = nn.Sequential(conv3x3(3, 16), nn.BatchNorm2d(16), nn.ReLU(inplace=True))
        blocks, channels = stages(lambda i, o, s, _: BasicBlock(i, o, s, shortcut), 16, (16, 32, 64), (1, 2, 2),
                                  (depth - 2) // 6)
        super().__init__(OrderedDict(inputs=Standardize(), stem=stem, blocks=blocks,
                                     head=classifier(channels, n_outputs)))
        # The paper initialises "as in [13]" (He et al. 2015), whose forward derivation counts fan-in.
        he_init(self, "fan_in")


@register_model("resnet")
def build_resnet(config):
    """He et al.'s CIFAR ResNet (configs/resnet.py)."""
    return ResNet(config["depth"], n_classes(config["dataset"], config["label_mode"]), config["shortcut"])


def basic_block_parameters(in_channels, out_channels, shortcut):
    changes = in_channels != out_channels  # in these layouts a stride comes with a change of channels
    projection = in_channels * out_channels + 2 * out_channels if changes and shortcut == "B" else 0
    return 9 * in_channels * out_channels + 9 * out_channels**2 + 4 * out_channels + projection


def resnet_parameters(depth, n_outputs, shortcut="A"):
    blocks = stage_parameters(lambda i, o: basic_block_parameters(i, o, shortcut), 16, (16, 32, 64), (depth - 2) // 6)
    return 27 * 16 + 2 * 16 + blocks + 65 * n_outputs
