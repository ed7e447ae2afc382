"""How big a model is: its parameters and the multiply-accumulates (MACs) of one image's forward pass.

Counted by torch (`torch.utils.flop_counter`: convolutions, dense layers and other matrix products;
MACs = FLOPs / 2) on a copy of the model on the "meta" device: shapes only, no memory, no arithmetic.
So measuring changes nothing of the model it is given (no forward pass through its batch norms, no
random numbers drawn, no memory on its device), and costs the same for WRN-28-10 as for the simple
CNN: 0.01-0.04 s here once torch's dispatch machinery is loaded, which the optimizer's first use
loads anyway (on its own, about 0.8 s, mostly importing torch._dynamo).
"""
import copy

import torch
from torch import nn

IMAGE_SHAPE = (3, 32, 32)


def count_parameters(model):
    return sum(p.numel() for p in model.parameters())


def meta_copy(model):
    """A deep copy of `model` whose parameters and buffers live on the meta device (no data is copied)."""
    memo = {}
    for tensor in [*model.parameters(), *model.buffers()]:
        shadow = tensor.detach().to("meta")
        memo[id(tensor)] = nn.Parameter(shadow, tensor.requires_grad) if isinstance(tensor, nn.Parameter) else shadow
    return copy.deepcopy(model, memo)


def macs_per_image(model, image_shape=IMAGE_SHAPE):
    """Multiply-accumulates of `model` on one uint8 image of `image_shape`, in eval mode; None when the
    model cannot run on the meta device (an operation without a meta kernel, a `.item()` in its forward)."""
    from torch.utils.flop_counter import FlopCounterMode

    try:
        shadow = meta_copy(model).eval()
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            shadow(torch.zeros(1, *image_shape, dtype=torch.uint8, device="meta"))
    except Exception:  # a user's model may fail on meta in any way (AttributeError, an assert, ...): the size
        return None      # is a record for the run table, never a reason to stop a run
    return counter.get_total_flops() // 2


def model_size(model, image_shape=IMAGE_SHAPE):
    """-> {"parameters": int, "macs_per_image": int or None}, what meta.json and the run table show."""
    return {"parameters": count_parameters(model), "macs_per_image": macs_per_image(model, tuple(image_shape))}


def format_macs(macs):
    """40551040 -> '40.6M', 5243328768 -> '5,243M' (the README's style); 192672 -> '0.19M'."""
    millions = macs / 1e6
    return f"{millions:,.0f}M" if millions >= 1000 else f"{millions:.1f}M" if millions >= 1 else f"{millions:.2f}M"
