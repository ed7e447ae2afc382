"""Pre-activation ResNet-18 of He et al. 2016, "Identity Mappings in Deep Residual Networks": the ImageNet
ResNet-18 layout (2 blocks at each of 64, 128, 256, 512 channels) with pre-activation blocks and the CIFAR
stem (one 3x3 convolution, no max-pool). Takes uint8 images (N, 3, 32, 32); one Standardize brick first.
"""
from collections import OrderedDict

from torch import nn

from src.data import n_classes
from src.networks.bricks import (
    PreActBlock, Standardize, classifier, conv3x3, final_activation, he_init, preact_block_parameters,
    stage_parameters, stages,
)
from src.networks.registry import register_model


class PreActResNet18(nn.Sequential):
    """Pre-activation ResNet-18 with the CIFAR stem, channels `width`, 2x, 4x, 8x (64 in the paper's layout).

    He et al.'s rules for the ends: the first unit's activation comes right after the stem's convolution,
    before the split into the two paths (so its identity shortcut carries the activated input), and the
    last unit is followed by an extra BN-ReLU. (kuangliu/pytorch-cifar's PreActResNet18, used by many later
    papers, leaves both out: 1,024 parameters fewer, the final batch norm's.)
    """

    def __init__(self, n_outputs, width=64):
        blocks, channels = stages(lambda i, o, s, index: PreActBlock(i, o, s, activate_shortcut=index == 0), width,
                                  tuple(width * m for m in (1, 2, 4, 8)), (1, 2, 2, 2), 2)
        super().__init__(OrderedDict(inputs=Standardize(), stem=conv3x3(3, width), blocks=blocks,
                                     final=final_activation(channels), head=classifier(channels, n_outputs)))
        # He normal, fan-out: fb.resnet.torch, the code the paper's models were trained with.
        he_init(self, "fan_out")


@register_model("preact_resnet")
def build_preact_resnet(config):
    """Pre-activation ResNet-18 (configs/preact_resnet.py)."""
    return PreActResNet18(n_classes(config["dataset"], config["label_mode"]), config["width"])


def preact_resnet18_parameters(n_outputs, width=64):
    widths = tuple(width * m for m in (1, 2, 4, 8))
    return 27 * width + stage_parameters(preact_block_parameters, width, widths, 2) + 2 * widths[-1] + (
        widths[-1] + 1) * n_outputs
