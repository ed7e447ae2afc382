"""The training stream: batches of a training set on the run's device, whose order and augmentation
(crop and flip, cutout, mixup) are pure functions of (seed, epoch, batch) (an alternating flip: of
(seed, epoch, image)), so that its position is its whole state; and the train/validation split, a
permutation seeded from the run's seed.
"""
import numpy as np

from src.errors import RunError, UsageError

SEED_SPLIT, SEED_ORDER, SEED_AUGMENT = 0, 1, 2
SEED_CUTOUT, SEED_MIXUP = 5, 6  # 3 and 4 are src.main_loop's
SEED_FLIP = 7  # each image's flip in the first epoch, under flip="alternate"
SEED_JITTER = 8  # brightness and contrast, per image and batch
PADDING_MODES = ("zeros", "reflect")  # what the crop's padding holds: zeros, or the image mirrored at its border
FLIPS = ("random", "alternate", "none")  # per image and epoch; every other epoch per image (airbench94); never
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

    Order and augmentation are pure functions of (seed, epoch, batch) (an alternating flip: of (seed,
    image) and the epoch's parity), so `epoch(e, start_batch=b)` yields exactly what an uninterrupted
    epoch yields from batch b on. The last partial batch of
    each epoch's permutation is dropped (a different remainder each epoch). With `shard=(rank,
    world_size)` it yields that rank's contiguous slice of every global batch, augmented exactly as
    a single process would augment those images.

    `augmentation(crop_padding, crop_padding_mode, flip)` sets what `augment` does (by default a crop with 4
    pixels of zero padding and a random flip per image). `jitter(brightness, contrast)` adds hiverge's colour
    jitter (float32 pixel values then). `regularise(cutout, mixup)` adds cutout and
    mixup (then the images are float32 pixel values, and under mixup each batch is `(images, labels,
    partner_labels, lam)`: see src.training.recipe).
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
        self.cutout, self.mixup = 0, 0.0
        self.brightness = self.contrast = 0.0
        self.augmentation()

    def augmentation(self, crop_padding=4, crop_padding_mode="zeros", flip="random"):
        """What `augment` does: a random translation by up to `crop_padding` pixels each way (a crop of the
        image padded by that much with `crop_padding_mode`; 0 = none), and a horizontal flip per image: `random`
        (50% per image and batch), `alternate` (airbench94's: 50% per image in epoch 0, then each image
        flipped exactly in the epochs it was not flipped in the one before) or `none`."""
        import torch

        side = min(self.images.shape[2:])
        for name, value, allowed in (("crop_padding_mode", crop_padding_mode, PADDING_MODES), ("flip", flip, FLIPS)):
            if value not in allowed:
                raise UsageError(f"--{name} must be one of {', '.join(allowed)}, not '{value}'")
        if not 0 <= crop_padding < side:  # a reflection needs a pixel to mirror: the padding's edge stays inside
            raise UsageError(f"--crop_padding must be in [0, {side - 1}] (less than the image's side), "
                             f"not {crop_padding}")
        self.crop_padding, self.crop_padding_mode, self.flip = crop_padding, crop_padding_mode, flip
        self.first_flips = None
        if flip == "alternate":  # image i's flip in epoch e is first_flips[i] xor (e odd): no state between epochs
            generator = torch.Generator().manual_seed(derive_seed(self.seed, SEED_FLIP))
            self.first_flips = self._on_device(torch.rand(len(self.images), generator=generator) < 0.5)
        return self

    def jitter(self, brightness=0.0, contrast=0.0):
        """hiverge/cifar10-speedrun's colour jitter (cifar10_speedrun.py, commit 828bcd7), per image: in the
        standardised image x, (x + b) c with b uniform in [-brightness, brightness] and c in [1 - contrast,
        1 + contrast], drawn from (seed, epoch, batch) like the stream's other draws; 0 = off."""
        self.brightness, self.contrast = brightness, contrast
        return self

    def regularise(self, cutout=0, mixup=0.0):
        """Cutout's square side (DeVries & Taylor 2017) and mixup's alpha (Zhang et al. 2018); 0 = off."""
        self.cutout, self.mixup = cutout, mixup
        return self

    def __len__(self):
        return len(self.images) // self.batch_size

    def epoch(self, epoch, start_batch=0):
        import torch

        generator = torch.Generator().manual_seed(derive_seed(self.seed, SEED_ORDER, epoch))
        order = self._on_device(torch.randperm(len(self.images), generator=generator))
        for b in range(start_batch, len(self)):
            batch = order[b * self.batch_size:(b + 1) * self.batch_size]
            index = batch[self.mine]
            x = self._images(index, self.mine, epoch, b)
            if self.mixup:
                yield self._mix(x, batch, index, epoch, b)
            else:
                yield x, self.labels[index]

    def _on_device(self, drawn):
        """Draws made on the host, sent to the device without waiting for it: on CUDA a copy from pageable
        memory would wait for every kernel queued so far, so they go through pinned memory, asynchronously."""
        if self.device.type != "cuda":
            return drawn.to(self.device)
        return drawn.pin_memory().to(self.device, non_blocking=True)

    def _images(self, index, at, epoch, batch):
        """The images `index`, rows `at` (a slice or indices) of global batch `batch`, augmented as those rows are."""
        x = self.images[index]
        if self.augment:
            x = self._augment(x, index, at, epoch, batch)
        if self.brightness or self.contrast:
            x = self._jitter(x, at, epoch, batch)
        if self.cutout:
            x = self._cutout(x, at, epoch, batch)
        return x

    def _augment(self, x, index, at, epoch, batch):
        """Translation and horizontal flip of the images `index`, rows `at` of global batch `batch`, on the whole
        batch at once."""
        shifts, flips = self._draws(index, at, epoch, batch)
        if shifts is None and flips is None:
            return x
        return self._crop_and_flip(x, shifts, flips)

    def _draws(self, index, at, epoch, batch):
        """(shifts (n, 2) in [0, 2 crop_padding], flips (n,) bool) for these rows; None where there are none.
        Drawn for the whole global batch, then this rank's rows: sharding never changes an image's draw. The
        default's draws (shifts, then flips, from one generator) are the ones the code made before the keys."""
        import torch

        generator = torch.Generator().manual_seed(derive_seed(self.seed, SEED_AUGMENT, epoch, batch))
        shifts = flips = None
        if self.crop_padding:
            span = 2 * self.crop_padding + 1
            shifts = self._on_device(torch.randint(0, span, (self.batch_size, 2), generator=generator)[at])
        if self.flip == "random":
            flips = self._on_device((torch.rand(self.batch_size, generator=generator) < 0.5)[at])
        elif self.flip == "alternate":
            flips = self.first_flips[index] ^ bool(epoch % 2)
        return shifts, flips

    def _crop_and_flip(self, x, shifts, flips):
        """Each image's window at `shifts` of itself padded by crop_padding, mirrored where `flips` says, taken
        by one gather from the flat batch: twice as fast as indexing with four broadcast index tensors."""
        import torch
        import torch.nn.functional as F

        n, c, h, w = x.shape
        p, arange = self.crop_padding, (lambda size: torch.arange(size, device=self.device))
        rows, cols = arange(h).expand(n, h), arange(w).expand(n, w)
        if shifts is not None:
            rows, cols = shifts[:, 0, None] + rows, shifts[:, 1, None] + cols  # in the padded image
        if self.crop_padding_mode == "reflect":  # the padded image's pixels, read from the image: no padded copy
            source, rows, cols = x, reflect(rows - p, h), reflect(cols - p, w)
        else:
            source = F.pad(x, (p, p, p, p))
        ph, pw = source.shape[2:]
        if flips is not None:
            cols = torch.where(flips[:, None], cols.flip(-1), cols)
        image_start = arange(n) * (c * ph * pw)
        channel_start = arange(c) * (ph * pw)
        where = (image_start[:, None, None, None] + channel_start[None, :, None, None]
                 + (rows * pw)[:, None, :, None] + cols[:, None, None, :])
        return source.reshape(-1)[where]

    def _jitter(self, x, at, epoch, batch):
        """Brightness then contrast, in the standardised image's units, computed on the pixel values: for x the
        pixels and m, s the channel statistics, m + ((x - m) + b s) c is the pixels of ((x - m) / s + b) c."""
        import torch

        generator = torch.Generator().manual_seed(derive_seed(self.seed, SEED_JITTER, epoch, batch))
        shifts = (torch.rand(self.batch_size, generator=generator) * 2 - 1) * self.brightness
        scales = 1 + (torch.rand(self.batch_size, generator=generator) * 2 - 1) * self.contrast
        b, c = (self._on_device(draw[at]).view(-1, 1, 1, 1) for draw in (shifts, scales))
        return self.mean + ((x.float() - self.mean) + b * self.std) * c

    def _cutout(self, x, at, epoch, batch):
        """A `cutout`-sided square per image, its centre uniform over the image, clipped at the borders, set to
        the training set's per-channel mean: 0 after the model's standardisation, as the reference code
        zeroes the normalised image. (Its side is `cutout` for odd sides too, where the reference's is one less.)"""
        import torch

        generator = torch.Generator().manual_seed(derive_seed(self.seed, SEED_CUTOUT, epoch, batch))
        h, w = x.shape[2:]
        centres = torch.stack([torch.randint(0, h, (self.batch_size,), generator=generator),
                               torch.randint(0, w, (self.batch_size,), generator=generator)], 1)
        corners = self._on_device(centres[at]) - self.cutout // 2  # the squares' top-left; may lie off the image
        offsets = [torch.arange(size, device=self.device) - corners[:, axis, None] for axis, size in enumerate((h, w))]
        inside = [(offset >= 0) & (offset < self.cutout) for offset in offsets]  # (n, h) and (n, w)
        square = inside[0][:, :, None] & inside[1][:, None, :]
        return torch.where(square[:, None], self.mean, x.float())

    def _mix(self, x, batch, index, epoch, b):
        """Mixup: every image mixed with its partner under one permutation of the global batch, with one
        lam ~ Beta(alpha, alpha) per batch. Each rank rebuilds its rows' partners, wherever they sit in the
        global batch, so that sharding changes nothing."""
        import torch

        rng = np.random.default_rng(derive_seed(self.seed, SEED_MIXUP, epoch, b))
        lam = float(rng.beta(self.mixup, self.mixup))
        partners = torch.from_numpy(rng.permutation(self.batch_size))[self.mine]  # rows of the global batch
        rows = self._on_device(partners)
        partner_index = batch[rows]
        if len(partners) == self.batch_size:  # one process: the partners are this batch's own rows
            partner_images = x[rows]
        else:  # a rank: its rows' partners may be in other ranks' slices; build them as those ranks do
            partner_images = self._images(partner_index, partners, epoch, b)
        mixed = lam * x.float() + (1 - lam) * partner_images.float()
        return mixed, self.labels[index], self.labels[partner_index], lam


def reflect(positions, size):
    """Positions in [-size + 1, 2 size - 2] folded into [0, size) as a mirror at each border (not repeating the
    edge pixel): torch's F.pad(mode="reflect"), and numpy's, as airbench94 pads."""
    return (size - 1) - ((size - 1) - positions.abs()).abs()


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
