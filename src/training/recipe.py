"""The training step, and the per-step parts of a training recipe: the training loss (label smoothing,
mixup's two targets) and gradient-norm clipping. The rest of the recipe lives where its state does:
cutout and mixup's images in the stream (src.datasets.stream), the EMA of the weights in an extension
(src.extensions.EMA), warmup and multistep in the schedules (src.training.optim).

A batch is `(images, labels)`, or under mixup `(images, labels, partner_labels, lam)`: the images are
`lam * image + (1 - lam) * partner image`, and `lam` is a Python float drawn on the host, so that no
step waits for the device.
"""
import torch
import torch.nn.functional as F

from src.training.hardware import autocast


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

    def clip(self, optimizer, scaler=None):
        """Clip the gradients' global norm to `grad_clip`, on the device (no host sync: the norm is never read
        back). Under DDP the gradients are already averaged, so every rank clips alike. Under fp16 the
        gradients are unscaled first, so the bound applies to the true gradients (the scaler then steps
        without unscaling twice, and still skips a step whose gradients hold an inf)."""
        if self.grad_clip:
            if scaler is not None:
                scaler.unscale_(optimizer)
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


def train_step(forward, optimizer, batch, device, precision, recipe=PLAIN, scaler=None):
    """One step on `batch` (the stream's: `(images, labels)`, under mixup `(images, labels, partner_labels,
    lam)`); -> (loss, logits), both still on the device (no host sync). The main loop's step, and bench.py's.

    `scaler` (fp16: src.training.hardware.grad_scaler) scales the loss before the backward pass and skips the
    optimizer step when a gradient is inf or NaN, then adapts its scale. The loss returned is the unscaled
    one, so a skipped step is not a diverging loss. (GradScaler reads its inf flag on the host: one sync
    per step, under fp16 only.)
    """
    images, labels, *mixed = batch
    with autocast(device, precision):
        logits = forward(images)
    loss = recipe.loss(logits.float(), labels, *mixed)
    optimizer.zero_grad(set_to_none=True)
    if scaler is None:
        loss.backward()
        recipe.clip(optimizer)
        optimizer.step()
        return loss, logits
    scaler.scale(loss).backward()
    recipe.clip(optimizer, scaler)
    scaler.step(optimizer)
    scaler.update()
    return loss, logits
