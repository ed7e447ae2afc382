"""Bricks the networks share: the Standardize input brick every model starts from, convolutions and
blocks, He initialisation, stages, the classifier head, and the parameter counts of the shared blocks.

A leaf of src.networks: it imports no network, so every network module (and src.models) imports it.
Models take uint8 images (N, 3, 32, 32) as the archives store them: standardisation is their first
brick, with the training set's statistics saved among the weights, so a loaded model needs nothing
else to classify raw CIFAR images.
"""
import torch
import torch.nn.functional as F
from torch import nn


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
        if x.is_floating_point() and not self.training:  # a user's batch (the loop feeds uint8 to evaluation)
            check_pixel_values(x)
        x = (x.float() - self.mean) / self.std
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x


def check_pixel_values(x):
    """A float batch given to a model in eval mode must hold pixel values 0..255, as the archives do: one
    already scaled to [0, 1] or [-1, 1], or standardised, would be standardised again and classified near
    chance, silently (0.107 against 0.583 on the demo). Checked only for float batches in eval mode, where
    the one host sync it costs (reading the batch's extremes) is no training step's."""
    if x.device.type == "meta" or not x.numel():
        return
    low, high = (value.item() for value in torch.aminmax(x.detach()))
    # Pixel values are whole numbers: a batch within [0, 1] holding fractions was scaled (black images pass).
    if low < 0 or (high <= 1 and bool((x.detach() != x.detach().round()).any())):
        raise ValueError(f"the images hold values in [{low:.3g}, {high:.3g}]; the model standardises its input "
                         "itself and takes pixel values 0..255 (uint8 as CIFAR stores them, or floats in that "
                         "range): pass the images unscaled")


def find_standardize(model):
    """The model's Standardize brick, wherever the family put it (found by type, not position)."""
    found = [m for m in model.modules() if isinstance(m, Standardize)]
    if len(found) != 1:
        raise ValueError(f"{type(model).__name__} must hold exactly one Standardize brick, it holds {len(found)}")
    return found[0]


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


# What the blocks above hold, counted without building them (a config's check refuses an absurd size
# before anything is allocated); tests/test_reference_models.py checks them against the built models.


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
