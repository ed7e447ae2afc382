"""Wide ResNet WRN-d-k of Zagoruyko & Komodakis 2016, "Wide Residual Networks": pre-activation blocks at
16k, 32k and 64k channels, (d - 4) / 6 per stage, dropout between the convolutions. Takes uint8 images
(N, 3, 32, 32); one Standardize brick first.
"""
from collections import OrderedDict

from torch import nn

from src.data import n_classes
from src.networks.bricks import (
    PreActBlock, Standardize, classifier, conv3x3, final_activation, he_init, preact_block_parameters,
    stage_parameters, stages,
)
from src.networks.registry import register_model


class WideResNet(nn.Sequential):
    """WRN-`depth`-`widen_factor` (depth = 6n + 4): a 3x3 convolution to 16 channels, three stages of n
    pre-activation blocks at 16k, 32k, 64k channels (strides 1, 2, 2), BN-ReLU, pooling, the classifier."""

    def __init__(self, depth, widen_factor, n_outputs, dropout=0.0):
        if depth < 10 or (depth - 4) % 6:
            raise ValueError(f"a Wide ResNet has depth 6n + 4 (n >= 1), not {depth}")
        widths = tuple(c * widen_factor for c in (16, 32, 64))
        blocks, channels = stages(lambda i, o, s, _: PreActBlock(i, o, s, dropout), 16, widths, (1, 2, 2),
                                  (depth - 4) // 6)
        super().__init__(OrderedDict(inputs=Standardize(), stem=conv3x3(3, 16), blocks=blocks,
                                     final=final_activation(channels), head=classifier(channels, n_outputs)))
        # As the authors' code and its usual PyTorch port (xternalz/WideResNet-pytorch): He normal, fan-out.
        he_init(self, "fan_out")


@register_model("wrn")
def build_wrn(config):
    """Zagoruyko & Komodakis's Wide ResNet (configs/wrn.py)."""
    return WideResNet(config["depth"], config["widen_factor"], n_classes(config["dataset"], config["label_mode"]),
                      config["dropout"])


def wrn_parameters(depth, widen_factor, n_outputs):
    widths = tuple(c * widen_factor for c in (16, 32, 64))
    return 27 * 16 + stage_parameters(preact_block_parameters, 16, widths, (depth - 4) // 6) + 2 * widths[-1] + (
        widths[-1] + 1) * n_outputs
