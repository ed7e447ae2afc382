"""CIFAR archives -> arrays (`load_cifar`), the cache of them, and the training stream (`get_cifar`).

The official files are read and checked by `src.cifar_files`; the decoded arrays are cached beside
them as `.npy`, with a checksum of each, so that later runs load in a fraction of a second. The stream
keeps the data on the run's device and draws all its randomness from (seed, epoch, batch), so its
position is its whole state.
"""
import contextlib
import fcntl
import hashlib
import io
import math
import os
import sys
import time
from pathlib import Path

import numpy as np

from src.cifar_files import IMAGE_SHAPE, decode, find_source, identity, is_archive  # noqa: F401 (IMAGE_SHAPE: public here)
from src.errors import RunError, UsageError
from src.files import TMP_PREFIX, atomic_write, read_json, remove_stale_temporaries, write_json

DATASETS = {
    "cifar10": {
        "archive": "cifar-10-python.tar.gz",
        "folder": "cifar-10-batches-py",
        "train": [f"data_batch_{i}" for i in range(1, 6)],
        "test": ["test_batch"],
        "labels": {"fine": "labels"},
        "n_classes": {"fine": 10},
    },
    "cifar100": {
        "archive": "cifar-100-python.tar.gz",
        "folder": "cifar-100-python",
        "train": ["train"],
        "test": ["test"],
        "labels": {"fine": "fine_labels", "coarse": "coarse_labels"},
        "n_classes": {"fine": 100, "coarse": 20},
    },
}
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
CACHE_VERSION = 1  # the folder's name; a manifest without checksums (written before they were) is rebuilt
MANIFEST = "manifest.json"
CHECKSUM = "sha256"
STALE_SECONDS = 3600  # without a lock, a temporary untouched this long is no live writer's
SEED_SPLIT, SEED_ORDER, SEED_AUGMENT = 0, 1, 2
_MASK64 = (1 << 64) - 1


def default_data_dir():
    return Path(os.environ.get("DATA_DIR") or "data")


def _spec(which, label_mode="fine"):
    if which not in DATASETS:
        raise ValueError(f"unknown dataset '{which}'; use one of {', '.join(DATASETS)}")
    spec = DATASETS[which]
    if label_mode not in spec["labels"]:
        raise ValueError(f"{which} has no '{label_mode}' labels; use one of {', '.join(spec['labels'])}")
    return spec


def n_classes(which, label_mode="fine"):
    return _spec(which, label_mode)["n_classes"][label_mode]


def load_cifar(which, data_dir=None, label_mode="fine"):
    """-> (x_train, y_train), (x_test, y_test); x uint8 (N, 3, 32, 32), y int64 (N,).

    Reads the official archive or its extracted folder from `data_dir` (default $DATA_DIR, else
    ./data), downloading the archive when neither is there.
    """
    spec = _spec(which, label_mode)
    data_dir = Path(data_dir) if data_dir is not None else default_data_dir()
    arrays = _load_cached(which, spec, data_dir)
    key = f"y_{{}}_{label_mode}"
    return (arrays["x_train"], arrays[key.format("train")]), (arrays["x_test"], arrays[key.format("test")])


def _cache_paths(which, data_dir):
    folder = data_dir / f"{which}-cache-v{CACHE_VERSION}"
    return folder, ["x_train", "x_test"] + [
        f"y_{part}_{mode}" for part in ("train", "test") for mode in DATASETS[which]["labels"]
    ]


def _load_cached(which, spec, data_dir):
    """The cache if it is whole and matches the source, else the source decoded (and cached).

    The cache is used only if its manifest (written last) matches the source and every file its
    checksum: never half old, half new, never a damaged or edited file.
    """
    folder, names = _cache_paths(which, data_dir)
    source = find_source(spec, data_dir)
    arrays = _read_cache(folder, names, spec, source)
    if arrays is not None:
        return arrays
    downloaded = source is None
    if downloaded:
        from src.download import download_archive

        source = download_archive(spec["archive"], data_dir)
    with _build_lock(data_dir, folder) as locked:
        arrays = _read_cache(folder, names, spec, source)  # built by another process while we waited?
        if arrays is None:
            arrays = _build_cache(folder, names, spec, source, locked)
            if not downloaded and is_archive(spec, source):  # a download had its MD5 checked already
                from src.download import warn_if_unofficial

                warn_if_unofficial(source)
    return arrays


def _build_cache(folder, names, spec, source, locked):
    arrays = decode(spec, source)
    try:
        (folder / MANIFEST).unlink(missing_ok=True)  # first: a build cut short leaves no manifest, so it is redone
        folder.mkdir(exist_ok=True)
        _remove_temporaries(folder, locked)
        sums = {name: _save_npy(folder / f"{name}.npy", arrays[name]) for name in names}
        write_json(folder / MANIFEST, {"source": identity(spec, source), "lengths": _lengths(arrays), CHECKSUM: sums})
    except OSError as e:  # a read-only shared data folder, say: train anyway, just without the cache
        print(f"warning: cannot cache the decoded arrays in {folder} ({e.strerror or e}); "
              "loading will be slower", file=sys.stderr)
    return arrays


@contextlib.contextmanager
def _build_lock(data_dir, folder):
    """An exclusive flock on DATA_DIR/.<cache folder>.lock while the cache is built: -> whether it is held.

    Two processes (DDP ranks, sweep jobs) may find the cache missing at once; the second waits, then
    uses what the first built, and no build ever deletes a live build's temporary files.
    """
    try:
        fd = os.open(data_dir / f".{folder.name}.lock", os.O_RDWR | os.O_CREAT, 0o666)
    except OSError:  # a read-only data folder: the cache cannot be written there either, so nothing to guard
        yield False
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"waiting for another process to finish building {folder}", file=sys.stderr)
            fcntl.flock(fd, fcntl.LOCK_EX)
        locked = True
    except OSError:  # a file system without flock (some Lustre and NFS mounts): build unguarded
        locked = False
    try:
        yield locked
    finally:
        os.close(fd)


def _remove_temporaries(folder, locked):
    """Delete the temporary files of a build that was killed (150 MB each on the real data).

    Every build writes them under the lock, so while we hold it they are all a dead process's. A killed
    build leaves no manifest, so the next load always rebuilds and gets here. Without the lock, only
    temporaries untouched for STALE_SECONDS go: a live build rewrites its file within seconds.
    """
    if locked:
        remove_stale_temporaries(folder)
        return
    for path in folder.glob(TMP_PREFIX + "*"):
        with contextlib.suppress(OSError):
            if time.time() - path.stat().st_mtime > STALE_SECONDS:
                path.unlink()


def _lengths(arrays):
    return {name: len(array) for name, array in arrays.items()}


def _read_cache(folder, names, spec, source):
    """The cached arrays, or None (rebuild) unless the manifest is whole, matches the source (when there is
    one) and every file its checksum."""
    manifest = _read_manifest(folder, names)
    if manifest is None or (source is not None and manifest["source"] != identity(spec, source)):
        return None
    arrays = {}
    for name in names:
        arrays[name] = _read_npy(folder / f"{name}.npy", manifest[CHECKSUM][name])
        if arrays[name] is None or len(arrays[name]) != manifest["lengths"][name]:
            return None
    return arrays


def _read_manifest(folder, names):
    """The manifest if it has every field with the right type for exactly these files, else None."""
    try:
        manifest = read_json(folder / MANIFEST)
    except (OSError, ValueError, RecursionError):
        return None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("source"), list):
        return None
    for field, kind in (("lengths", int), (CHECKSUM, str)):
        entries = manifest.get(field)
        if not isinstance(entries, dict) or set(entries) != set(names):
            return None
        if any(type(value) is not kind for value in entries.values()):
            return None
    return manifest


def _read_npy(path, checksum):
    """The array in a cache file, or None unless the file is byte for byte the one we wrote.

    The bytes are checked before numpy parses any of them. Cost, measured on a 2-core Xeon with SHA-NI:
    on the 150 MB of x_train, reading 0.035 s and sha256 0.11 s (blake2b 0.20 s, md5 0.24 s); a whole
    CIFAR-10 cache (184 MB) loads in 0.25 s instead of 0.045 s unchecked. CPUs without SHA-NI hash
    sha256 at about 0.4 GB/s: about 0.5 s.
    """
    try:
        with open(path, "rb") as f:
            raw = bytearray(os.fstat(f.fileno()).st_size)  # a bytearray: the array stays writable
            if f.readinto(raw) != len(raw):
                return None
    except OSError:
        return None
    if hashlib.sha256(raw).hexdigest() != checksum:
        return None
    header = io.BytesIO(bytes(memoryview(raw)[:4096]))
    try:
        version = np.lib.format.read_magic(header)
        read = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}[version]
        shape, fortran_order, dtype = read(header)
        if fortran_order or dtype.hasobject:
            return None
        return np.frombuffer(raw, dtype, count=math.prod(shape), offset=header.tell()).reshape(shape)
    except (ValueError, KeyError, TypeError):
        return None


class _HashingWriter:
    """A file that hashes the bytes written through it (np.save then writes 16 MB chunks, not `tofile`)."""

    def __init__(self, file, digest):
        self.file, self.digest = file, digest

    def write(self, data):
        self.digest.update(data)
        return self.file.write(data)


def _save_npy(path, array):
    """Write `array` to `path` as .npy, atomically; -> the checksum of the file's bytes."""
    digest = hashlib.new(CHECKSUM)
    atomic_write(path, lambda f: np.save(_HashingWriter(f, digest), array, allow_pickle=False))
    return digest.hexdigest()


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


def get_cifar(which, augment, batch_size, seed, device, valid_size=5000, n_examples=-1,
              label_mode="fine", data_dir=None, shard=(0, 1)):
    """-> (training stream, (x_valid, y_valid)) on `device`. Never the test set."""
    import torch

    (x, y), _ = load_cifar(which, data_dir, label_mode)
    train, valid = split_train_valid(len(x), valid_size, n_examples, seed)
    if batch_size > len(train):  # the global batch, under DDP too: TrainStream would clamp it silently
        images = (f"{len(train)} training images left after --valid_size={valid_size}" if n_examples == -1
                  else f"--n_examples={n_examples} training images")
        raise UsageError(f"--batch_size={batch_size} is larger than the {images}; use at most {len(train)}")
    x, y = torch.from_numpy(x), torch.from_numpy(y)

    def pick(indices):  # torch's index_select copies several times faster than numpy's fancy indexing
        indices = torch.from_numpy(np.sort(indices))
        return x.index_select(0, indices), y.index_select(0, indices)

    stream = TrainStream(*pick(train), batch_size, seed, augment, device, shard)
    x_valid, y_valid = pick(valid)
    return stream, (x_valid.to(device), y_valid.to(device))


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
