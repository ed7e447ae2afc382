"""Residual networks for CIFAR, built as their papers define them:

- ResNet-(6n+2) of He et al. 2016, "Deep Residual Learning for Image Recognition", Sec. 4.2: a 3x3
  convolution, three stages of n basic blocks at 16, 32 and 64 channels (the second and third
  start with stride 2), global average pooling and the classifier;
- Wide ResNet WRN-d-k of Zagoruyko & Komodakis 2016, "Wide Residual Networks": pre-activation
  blocks at 16k, 32k and 64k channels, (d - 4) / 6 per stage, dropout between the convolutions;
- pre-activation ResNet-18 of He et al. 2016, "Identity Mappings in Deep Residual Networks": the
  ImageNet ResNet-18 layout (2 blocks at each of 64, 128, 256, 512 channels) with pre-activation
  blocks and the CIFAR stem (one 3x3 convolution, no max-pool).

Each takes uint8 images (N, 3, 32, 32) and holds one src.models.Standardize brick, its first child.
"""
from collections import OrderedDict

import torch.nn.functional as F
from torch import nn

from src.data import n_classes


def standardize():
    """A src.models.Standardize brick. Imported when called: src.models imports this module for its MODELS
    registry, so an import at the top would make each module's import depend on which is imported first."""
    from src.models import Standardize

    return Standardize()


def conv3x3(in_channels, out_channels, stride=1):
    return nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)  # batch norm follows


def he_init(model, mode):
    """He et al. 2015 ("Delving Deep into Rectifiers") normal initialisation of every convolution, std
    sqrt(2 / fan), fan counted over the inputs (`fan_in`) or the outputs (`fan_out`); the classifier's
    bias at 0. Batch norm keeps PyTorch's 1 and 0, the classifier's weight PyTorch's default."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode=mode, nonlinearity="relu")
        elif isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)


def stages(make_block, in_channels, widths, strides, blocks_per_stage):
    """-> (the blocks in sequence, channels out): a stage per width, its first block with the stage's stride."""
    blocks = []
    for width, stride in zip(widths, strides, strict=True):
        for i in range(blocks_per_stage):
            blocks.append(make_block(in_channels, width, stride if i == 0 else 1, len(blocks)))
            in_channels = width
    return nn.Sequential(*blocks), in_channels


def classifier(in_channels, n_outputs, dropout=0.0):
    """Global average pooling, (dropout,) the dense layer."""
    layers = [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    if dropout > 0:
        layers.append(nn.Dropout(dropout))
    return nn.Sequential(*layers, nn.Linear(in_channels, n_outputs))


# ------------------------------------------------------------------ He et al. 2016: ResNet-20 ... ResNet-110


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
        super().__init__(OrderedDict(inputs=standardize(), stem=stem, blocks=blocks,
                                     head=classifier(channels, n_outputs)))
        # The paper initialises "as in [13]" (He et al. 2015), whose forward derivation counts fan-in.
        he_init(self, "fan_in")


def build_resnet(config):
    """He et al.'s CIFAR ResNet (configs/resnet.py)."""
    return ResNet(config["depth"], n_classes(config["dataset"], config["label_mode"]), config["shortcut"])


# ------------------------------------------------------------------ pre-activation: Wide ResNets, PreAct-ResNet-18


class PreActBlock(nn.Module):
    """BN-ReLU-conv3x3-BN-ReLU(-dropout)-conv3x3, plus the shortcut: the input itself, or where the shape
    changes a 1x1 convolution of the activated input (as both papers' code does). `activate_shortcut` also
    gives an identity shortcut the activated input (He et al.'s rule for the unit right after the stem)."""

    def __init__(self, in_channels, out_channels, stride, dropout=0.0, activate_shortcut=False):
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(in_channels), conv3x3(in_channels, out_channels, stride)
        self.bn2, self.conv2 = nn.BatchNorm2d(out_channels), conv3x3(out_channels, out_channels)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        changes = stride != 1 or in_channels != out_channels
        self.projection = nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False) if changes else None
        self.activate_shortcut = activate_shortcut

    def forward(self, x):
        activated = F.relu(self.bn1(x))
        out = self.conv2(self.dropout(F.relu(self.bn2(self.conv1(activated)))))
        if self.projection is not None:
            return out + self.projection(activated)
        return out + (activated if self.activate_shortcut else x)


def final_activation(channels):
    """The BN-ReLU after the last pre-activation block's addition, before the pooling."""
    return nn.Sequential(nn.BatchNorm2d(channels), nn.ReLU(inplace=True))


class WideResNet(nn.Sequential):
    """WRN-`depth`-`widen_factor` (depth = 6n + 4): a 3x3 convolution to 16 channels, three stages of n
    pre-activation blocks at 16k, 32k, 64k channels (strides 1, 2, 2), BN-ReLU, pooling, the classifier."""

    def __init__(self, depth, widen_factor, n_outputs, dropout=0.0):
        if depth < 10 or (depth - 4) % 6:
            raise ValueError(f"a Wide ResNet has depth 6n + 4 (n >= 1), not {depth}")
        widths = tuple(c * widen_factor for c in (16, 32, 64))
        blocks, channels = stages(lambda i, o, s, _: PreActBlock(i, o, s, dropout), 16, widths, (1, 2, 2),
                                  (depth - 4) // 6)
        super().__init__(OrderedDict(inputs=standardize(), stem=conv3x3(3, 16), blocks=blocks,
                                     final=final_activation(channels), head=classifier(channels, n_outputs)))
        # As the authors' code and its usual PyTorch port (xternalz/WideResNet-pytorch): He normal, fan-out.
        he_init(self, "fan_out")


def build_wrn(config):
    """Zagoruyko & Komodakis's Wide ResNet (configs/wrn.py)."""
    return WideResNet(config["depth"], config["widen_factor"], n_classes(config["dataset"], config["label_mode"]),
                      config["dropout"])


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
        super().__init__(OrderedDict(inputs=standardize(), stem=conv3x3(3, width), blocks=blocks,
                                     final=final_activation(channels), head=classifier(channels, n_outputs)))
        # He normal, fan-out: fb.resnet.torch, the code the paper's models were trained with.
        he_init(self, "fan_out")


def build_preact_resnet(config):
    """Pre-activation ResNet-18 (configs/preact_resnet.py)."""
    return PreActResNet18(n_classes(config["dataset"], config["label_mode"]), config["width"])


# ------------------------------------------------------------------ sizes from the numbers alone
# What the classes above hold, counted without building them (a config's check refuses an absurd size
# before anything is allocated); tests/test_reference_models.py checks them against the built models.


def basic_block_parameters(in_channels, out_channels, shortcut):
    changes = in_channels != out_channels  # in these layouts a stride comes with a change of channels
    projection = in_channels * out_channels + 2 * out_channels if changes and shortcut == "B" else 0
    return 9 * in_channels * out_channels + 9 * out_channels**2 + 4 * out_channels + projection


def preact_block_parameters(in_channels, out_channels):
    projection = in_channels * out_channels if in_channels != out_channels else 0
    return 2 * in_channels + 9 * in_channels * out_channels + 2 * out_channels + 9 * out_channels**2 + projection


def stage_parameters(block_parameters, in_channels, widths, blocks_per_stage):
    """The blocks of `stages(...)`: each stage's first block, then blocks_per_stage - 1 alike."""
    total = 0
    for width in widths:
        total += block_parameters(in_channels, width) + (blocks_per_stage - 1) * block_parameters(width, width)
        in_channels = width
    return total


def resnet_parameters(depth, n_outputs, shortcut="A"):
    blocks = stage_parameters(lambda i, o: basic_block_parameters(i, o, shortcut), 16, (16, 32, 64), (depth - 2) // 6)
    return 27 * 16 + 2 * 16 + blocks + 65 * n_outputs


def wrn_parameters(depth, widen_factor, n_outputs):
    widths = tuple(c * widen_factor for c in (16, 32, 64))
    return 27 * 16 + stage_parameters(preact_block_parameters, 16, widths, (depth - 4) // 6) + 2 * widths[-1] + (
        widths[-1] + 1) * n_outputs


def preact_resnet18_parameters(n_outputs, width=64):
    widths = tuple(width * m for m in (1, 2, 4, 8))
    return 27 * width + stage_parameters(preact_block_parameters, width, widths, 2) + 2 * widths[-1] + (
        widths[-1] + 1) * n_outputs
