"""The training stream: batches of a training set on the run's device, whose order and augmentation
are pure functions of (seed, epoch, batch), so that its position is its whole state; and the
train/validation split, a permutation seeded from the run's seed.
"""
import numpy as np

from src.errors import RunError, UsageError

SEED_SPLIT, SEED_ORDER, SEED_AUGMENT = 0, 1, 2
_MASK64 = (1 << 64) - 1


def derive_seed(*numbers):
    """A well-mixed 63-bit seed from a tuple of ints (SplitMix64 over them), so each (seed, epoch, batch)
    gets its own random stream. A few microseconds: it runs twice per training step."""
    state = 0
    for number in numbers:
        state = (state ^ (int(number) & _MASK64)) + 0x9E3779B97F4A7C15 & _MASK64
        state = (state ^ (state >> 30)) * 0xBF58476D1CE4E5B9 & _MASK64
        state = (state ^ (state >> 27)) * 0x94D049BB133111EB & _MASK64
        state ^= state >> 31
    return state >> 1


def split_train_valid(n_train, valid_size, n_examples, seed):
    """Indices of the training and validation examples: a permutation seeded from `seed`."""
    if valid_size >= n_train:
        raise RunError(f"--valid_size={valid_size} leaves no training data: the set has {n_train} images")
    left = n_train - valid_size
    if n_examples > left:  # never silently fewer than asked: config.json would record a run that did not happen
        raise UsageError(f"--n_examples={n_examples} is larger than the {left} training images left after "
                         f"--valid_size={valid_size}; use at most {left}, or -1 for all of them")
    order = np.random.default_rng(derive_seed(seed, SEED_SPLIT)).permutation(n_train)
    valid, train = order[:valid_size], order[valid_size:]
    if n_examples != -1:
        train = train[:n_examples]
    return train, valid


class TrainStream:
    """Batches of (uint8 images, labels) for one epoch, from any batch on; the model standardises them.

    Order and augmentation are pure functions of (seed, epoch, batch): `epoch(e, start_batch=b)`
    yields exactly what an uninterrupted epoch yields from batch b on. The last partial batch of
    each epoch's permutation is dropped (a different remainder each epoch). With `shard=(rank,
    world_size)` it yields that rank's contiguous slice of every global batch, augmented exactly as
    a single process would augment those images.
    """

    def __init__(self, images, labels, batch_size, seed, augment, device, shard=(0, 1)):
        import torch

        self.images = images.to(device)
        self.labels = labels.to(device)
        self.batch_size = min(batch_size, len(images))  # get_cifar refuses a larger one; this is for direct use
        self.seed, self.augment, self.device = seed, augment, torch.device(device)
        rank, world_size = shard
        per_rank = self.batch_size // world_size
        self.mine = slice(rank * per_rank, (rank + 1) * per_rank)
        self.mean, self.std = channel_mean_std(self.images)

    def __len__(self):
        return len(self.images) // self.batch_size

    def epoch(self, epoch, start_batch=0):
        import torch

        generator = torch.Generator().manual_seed(derive_seed(self.seed, SEED_ORDER, epoch))
        order = torch.randperm(len(self.images), generator=generator).to(self.device)
        for b in range(start_batch, len(self)):
            index = order[b * self.batch_size:(b + 1) * self.batch_size][self.mine]
            x = self.images[index]
            if self.augment:
                x = self._augment(x, epoch, b)
            yield x, self.labels[index]

    def _augment(self, x, epoch, batch):
        """Random crop with 4 pixels of zero padding, and horizontal flip, on the whole batch."""
        import torch
        import torch.nn.functional as F

        generator = torch.Generator().manual_seed(derive_seed(self.seed, SEED_AUGMENT, epoch, batch))
        # Drawn for the whole global batch, then this rank's rows: sharding never changes an image's draw.
        shifts = torch.randint(0, 9, (self.batch_size, 2), generator=generator)[self.mine].to(self.device)
        flips = (torch.rand(self.batch_size, generator=generator) < 0.5)[self.mine].to(self.device)
        n, _, h, w = x.shape
        padded = F.pad(x, (4, 4, 4, 4))
        c, ph, pw = padded.shape[1:]
        rows = shifts[:, 0, None] + torch.arange(h, device=self.device)  # (n, h)
        cols = shifts[:, 1, None] + torch.arange(w, device=self.device)  # (n, w)
        cols = torch.where(flips[:, None], cols.flip(-1), cols)
        # One gather from the flat padded batch: twice as fast as indexing with four broadcast index tensors.
        image_start = torch.arange(n, device=self.device) * (c * ph * pw)
        channel_start = torch.arange(c, device=self.device) * (ph * pw)
        where = (image_start[:, None, None, None] + channel_start[None, :, None, None]
                 + (rows * pw)[:, None, :, None] + cols[:, None, None, :])
        return padded.reshape(-1)[where]


def channel_mean_std(images):
    """Exact per-channel mean and std (float32, (1, C, 1, 1)) of uint8 images, from 256-bin histograms."""
    import torch

    values = torch.arange(256, dtype=torch.float64, device=images.device)
    means, stds = [], []
    for c in range(images.shape[1]):
        counts = torch.bincount(images[:, c].reshape(-1), minlength=256).double()
        mean = (counts * values).sum() / counts.sum()
        var = (counts * values**2).sum() / counts.sum() - mean**2
        means.append(mean)
        stds.append(var.clamp_min(1e-12).sqrt())
    shape = (1, len(means), 1, 1)
    return torch.stack(means).float().view(shape), torch.stack(stds).float().view(shape)
