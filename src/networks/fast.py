"""The fast family: a small VGG-like CIFAR net after KellerJordan's airbench94, the public CIFAR-10 speed
record (94% test accuracy in 3.83 s on an A100; github.com/KellerJordan/cifar10-airbench), written anew
for this codebase's main loop.

    Standardize           uint8 -> standardised floats (the training set's statistics, like every family)
    Whitening             2x2 convolution, 3 -> 24 channels: the 12 eigenvectors of the training patches'
                          second-moment matrix, scaled by 1 / sqrt(eigenvalue + 5e-4), and their negatives;
                          its weight frozen, its bias trained for the first `whiten_bias_epochs` epochs
    GELU
    3 x ConvGroup         conv 3x3 -> max-pool 2 -> BN -> GELU -> conv 3x3 -> BN -> GELU; 64, 256, 256 channels;
                          no conv biases; BN weights frozen at 1, only their biases trained
    max-pool 3, Linear    3x3 -> 1x1 (31 -> 15 -> 7 -> 3 after the whitening's valid 2x2), 256 -> classes, no bias
    Scale                 the logits times 1/9

1,972,792 parameters at CIFAR-10, as airbench94's `make_net()` (1,971,352 of them trained).

`init_from_data(images)` sets the whitening from training images (the main loop calls it with the
stream's, never validation or test images); `parameter_groups(config)` gives the optimizer airbench's
groups: batch-norm biases at `bias_lr_scale` times the lr (weight decay divided by it, so their decay
per step is the other weights'), the whitening bias frozen after `whiten_bias_epochs` (src.training.optim).
"""
from collections import OrderedDict

import torch
from torch import nn

from src.data import n_classes
from src.networks.bricks import Standardize
from src.networks.registry import register_model

PATCH = 2  # the whitening's patch side
WHITEN_EPS = 5e-4  # added to the eigenvalues: keeps the near-zero directions from being blown up
CHUNK = 500  # images per step of the patch statistics: 500 x 961 patches x 12 doubles = 46 MB at a time


class Whitening(nn.Conv2d):
    """A `patch` x `patch` valid convolution whose 2 * C * patch^2 filters whiten the input's patches."""

    def __init__(self, in_channels=3, patch=PATCH):
        super().__init__(in_channels, 2 * in_channels * patch**2, patch, bias=True)
        self.weight.requires_grad_(False)  # set from the data, never trained
        nn.init.zeros_(self.bias)

    @torch.no_grad()
    def set_from(self, images):
        """Filters from `images` (standardised floats, N x C x H x W, on any device): the eigenvectors of
        the patches' second-moment matrix (uncentred, as airbench's) by decreasing eigenvalue, each scaled by
        1 / sqrt(eigenvalue + WHITEN_EPS), then the same negated (GELU follows: both signs pass)."""
        moments = patch_moments(images, self.kernel_size[0])
        values, vectors = torch.linalg.eigh(moments)  # ascending; float64 on the CPU: the same on every device
        values, vectors = values.flip(0), vectors.flip(1)
        filters = (vectors / torch.sqrt(values + WHITEN_EPS)).T.reshape(-1, *self.weight.shape[1:])
        self.weight.copy_(torch.cat([filters, -filters]).to(self.weight))


def patch_moments(images, patch):
    """The mean of p p^T over every `patch` x `patch` patch p of `images` (flattened channel-major, as a
    convolution's filter is): a float64 (d, d) matrix on the CPU, d = C * patch^2. In float64 on the images'
    device, a chunk at a time, so that no TF32 or reduced-precision setting touches it (0.35 s for 5,000
    images on 2 busy CPU cores, 0.15 s in float32; on a GPU, milliseconds)."""
    d = images.shape[1] * patch**2
    total = torch.zeros(d, d, dtype=torch.float64)
    count = 0
    for start in range(0, len(images), CHUNK):
        patches = nn.functional.unfold(images[start:start + CHUNK].double(), patch)  # (n, d, positions)
        patches = patches.transpose(1, 2).reshape(-1, d)
        total += (patches.T @ patches).cpu()
        count += len(patches)
    return total / count


def batch_norm(channels, momentum):
    """Batch norm with its weight frozen at 1 (only the bias trains) and eps 1e-12, as airbench's.
    `momentum` in PyTorch's sense (the new batch's weight): airbench's 0.6 is PyTorch's 0.4."""
    norm = nn.BatchNorm2d(channels, eps=1e-12, momentum=momentum)
    norm.weight.requires_grad_(False)
    return norm


def conv3x3(in_channels, out_channels):
    """3x3, same padding, no bias; PyTorch's default init, then the first `in_channels` filters the
    identity (dirac), as airbench's: each group starts by passing its input through."""
    conv = nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False)
    with torch.no_grad():
        nn.init.dirac_(conv.weight[:min(in_channels, out_channels)])
    return conv


ACTIVATIONS = {"gelu": nn.GELU, "silu": nn.SiLU}  # airbench's GELU; hiverge's speedrun has SiLU in its groups


class ConvGroup(nn.Sequential):
    """conv 3x3 -> max-pool 2 -> BN -> GELU -> conv 3x3 -> BN -> GELU (or SiLU): halves the image."""

    def __init__(self, in_channels, out_channels, bn_momentum, activation="gelu"):
        act = ACTIVATIONS[activation]
        super().__init__(OrderedDict(
            conv1=conv3x3(in_channels, out_channels), pool=nn.MaxPool2d(2), norm1=batch_norm(out_channels, bn_momentum),
            act1=act(), conv2=conv3x3(out_channels, out_channels), norm2=batch_norm(out_channels, bn_momentum),
            act2=act()))


class Scale(nn.Module):
    def __init__(self, factor):
        super().__init__()
        self.factor = factor

    def forward(self, x):
        return x * self.factor

    def extra_repr(self):
        return f"factor={self.factor}"


class FastNet(nn.Sequential):
    """airbench94's net for uint8 images; `widths`: the three groups' channels (airbench's 64, 256, 256)."""

    def __init__(self, n_outputs, widths=(64, 256, 256), bn_momentum=0.4, logit_scale=1 / 9, whiten_images=5000,
                 head_init="default", activation="gelu"):
        groups, channels = [], 2 * 3 * PATCH**2
        for width in widths:
            groups.append(ConvGroup(channels, width, bn_momentum, activation))
            channels = width
        super().__init__(OrderedDict(
            inputs=Standardize(), whiten=Whitening(3, PATCH), whiten_act=nn.GELU(), groups=nn.Sequential(*groups),
            pool=nn.MaxPool2d(3), flatten=nn.Flatten(), head=nn.Linear(channels, n_outputs, bias=False),
            scale=Scale(logit_scale)))
        self.whiten_images = whiten_images
        if head_init == "unit_std":  # airbench94_muon's: PyTorch's init, then every weight divided by their std
            with torch.no_grad():
                self.head.weight /= self.head.weight.std()

    @torch.no_grad()
    def init_from_data(self, images):
        """Whitening from the first `whiten_images` of `images` (uint8, the training stream's: never
        validation or test images), standardised as the model will see them. Deterministic: the stream's
        images are the run's training split in index order, itself a function of the seed."""
        x = images[:self.whiten_images]
        mean, std = self.inputs.mean.to(x.device), self.inputs.std.to(x.device)
        self.whiten.set_from((x.float() - mean) / std)  # float32, as the model standardises them

    def parameter_groups(self, config):
        """airbench's optimizer groups (src.training.optim.set_learning_rate reads `lr_scale`, `until_epoch` and
        `decay_to_zero`): the rest at lr; batch-norm biases at lr * bias_lr_scale with weight_decay /
        bias_lr_scale; the whitening bias at lr until `whiten_bias_epochs` epochs are done, then frozen (with
        whiten_bias_decay=linear, its lr falls linearly to 0 by then). The frozen weights (whitening, batch-norm
        scales) stay in the first group: they never get a gradient, so no step.

        With optimizer=muon (airbench94_muon's split) the conv filter banks are Muon's own group, and with
        head_lr_scale > 0 the head has its own group, at lr * head_lr_scale with weight_decay / head_lr_scale;
        without them the groups are exactly the three above, as every run before these keys existed."""
        scale = config["bias_lr_scale"]
        norm_biases = [m.bias for m in self.modules() if isinstance(m, nn.BatchNorm2d)]
        special = {id(p) for p in [*norm_biases, self.whiten.bias]}
        whiten = {"params": [self.whiten.bias], "until_epoch": config["whiten_bias_epochs"]}
        if config["whiten_bias_decay"] == "linear":
            whiten["decay_to_zero"] = config["lr"]  # from the peak lr, not the schedule's
        groups = [{"params": norm_biases, "lr": config["lr"] * scale, "lr_scale": scale,
                   "weight_decay": config["weight_decay"] / scale}, whiten]
        if config["optimizer"] == "muon":
            banks = [m.weight for m in self.groups.modules() if isinstance(m, nn.Conv2d)]
            groups.insert(0, {"params": banks, "muon": True})
            special |= {id(p) for p in banks}
            for group in groups[1:]:
                group["muon"] = False
        if config["head_lr_scale"] > 0:
            head = config["head_lr_scale"]
            groups.append({"params": [self.head.weight], "lr": config["lr"] * head, "lr_scale": head,
                           "weight_decay": config["weight_decay"] / head, "muon": False})
            special.add(id(self.head.weight))
        rest = [p for p in self.parameters() if id(p) not in special]
        return [{"params": rest, **({"muon": False} if config["optimizer"] == "muon" else {})}, *groups]


@register_model("fast")
def build_fast(config):
    """The fast family (configs/fast.py)."""
    return FastNet(n_classes(config["dataset"], config["label_mode"]), tuple(config["widths"]), config["bn_momentum"],
                   config["logit_scale"], config["whiten_images"], config["head_init"], config["activation"])


def fast_parameters(widths, n_outputs):
    """What `FastNet(n_outputs, widths)` holds, counted without building it (for the config's check)."""
    channels = 2 * 3 * PATCH**2
    total = channels * (3 * PATCH**2 + 1)  # the whitening's filters and bias
    for width in widths:
        total += 9 * channels * width + 9 * width * width + 4 * width  # two convs, two batch norms
        channels = width
    return total + channels * n_outputs
