"""The training step, and the per-step parts of a training recipe: the training loss (label smoothing,
mixup's two targets) and gradient-norm clipping. The rest of the recipe lives where its state does:
cutout and mixup's images in the stream (src.stream), the EMA of the weights in an extension
(src.extensions.EMA), warmup and multistep in the schedules (src.optim).

A batch is `(images, labels)`, or under mixup `(images, labels, partner_labels, lam)`: the images are
`lam * image + (1 - lam) * partner image`, and `lam` is a Python float drawn on the host, so that no
step waits for the device.
"""
import torch
import torch.nn.functional as F

from src.hardware import autocast


class Recipe:
    """What the step does beyond plain cross-entropy and an optimizer step; all off by default."""

    def __init__(self, label_smoothing=0.0, grad_clip=0.0):
        self.label_smoothing, self.grad_clip = label_smoothing, grad_clip

    @classmethod
    def from_config(cls, config):
        return cls(config["label_smoothing"], config["grad_clip"])

    def loss(self, logits, labels, partner_labels=None, lam=1.0):
        """Cross-entropy with label smoothing; under mixup lam * CE(labels) + (1 - lam) * CE(partner labels),
        as Zhang et al.'s reference code. (Validation loss stays plain cross-entropy: src.evaluation.)"""
        loss = F.cross_entropy(logits, labels, label_smoothing=self.label_smoothing)
        if partner_labels is None:
            return loss
        return lam * loss + (1 - lam) * F.cross_entropy(logits, partner_labels, label_smoothing=self.label_smoothing)

    def clip(self, optimizer):
        """Clip the gradients' global norm to `grad_clip`, on the device (no host sync: the norm is never read
        back). Under DDP the gradients are already averaged, so every rank clips alike."""
        if self.grad_clip:
            params = [p for group in optimizer.param_groups for p in group["params"]]
            torch.nn.utils.clip_grad_norm_(params, self.grad_clip)


PLAIN = Recipe()


def scored_labels(batch):
    """The labels training accuracy is counted against: under mixup, those of the larger share of each image
    (lam is the same for the whole batch)."""
    _, labels, *mixed = batch
    if not mixed:
        return labels
    partner_labels, lam = mixed
    return labels if lam >= 0.5 else partner_labels


def train_step(forward, optimizer, batch, device, precision, recipe=PLAIN):
    """One step on `batch` (the stream's: `(images, labels)`, under mixup `(images, labels, partner_labels,
    lam)`); -> (loss, logits), both still on the device (no host sync). The main loop's step, and bench.py's."""
    images, labels, *mixed = batch
    with autocast(device, precision):
        logits = forward(images)
    loss = recipe.loss(logits.float(), labels, *mixed)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    recipe.clip(optimizer)
    optimizer.step()
    return loss, logits
