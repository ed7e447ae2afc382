"""CIFAR archives -> arrays (`load_cifar`), and the training stream (`get_cifar`).

The official files are Python-2 pickles; decoded arrays are cached beside them as `.npy` so that
later runs load in a fraction of a second. The stream keeps the data on the run's device and draws
all its randomness from (seed, epoch, batch), so its position is its whole state.
"""
import gzip
import io
import os
import pickle
import sys
import tarfile
import zlib
from pathlib import Path

import numpy as np

from src.errors import RunError
from src.files import atomic_write, read_json, write_json

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
IMAGE_SHAPE = (3, 32, 32)
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
CACHE_VERSION = 1
MANIFEST = "manifest.json"
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
    """The cache is used only if its manifest (written last) matches the source: never half old, half new."""
    folder, names = _cache_paths(which, data_dir)
    source = _find_source(spec, data_dir)
    manifest = _read_manifest(folder)
    if manifest is not None and (source is None or manifest["source"] == _identity(spec, source)):
        try:
            arrays = {name: np.load(folder / f"{name}.npy", allow_pickle=False) for name in names}
            if _lengths(arrays) == manifest["lengths"]:
                return arrays
        except (OSError, ValueError, EOFError):
            pass  # an incomplete or damaged cache is rebuilt from the source
    if source is None:
        from src.download import download_archive

        source = download_archive(spec["archive"], data_dir)
    arrays = _decode(spec, source)
    try:
        (folder / MANIFEST).unlink(missing_ok=True)
        folder.mkdir(exist_ok=True)
        for name in names:
            atomic_write(folder / f"{name}.npy", lambda f, a=arrays[name]: np.save(f, a, allow_pickle=False))
        write_json(folder / MANIFEST, {"source": _identity(spec, source), "lengths": _lengths(arrays)})
    except OSError as e:  # a read-only shared data folder, say: train anyway, just without the cache
        print(f"warning: cannot cache the decoded arrays in {folder} ({e.strerror or e}); "
              "loading will be slower", file=sys.stderr)
    return arrays


def _identity(spec, source):
    """Names, sizes and modification times of the source files: a changed source invalidates the cache."""
    files = [source / name for name in spec["train"] + spec["test"]] if source.is_dir() else [source]
    return [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in files if f.exists()]


def _lengths(arrays):
    return {name: len(array) for name, array in arrays.items()}


def _read_manifest(folder):
    try:
        return read_json(folder / MANIFEST)
    except (OSError, ValueError):
        return None


def _find_source(spec, data_dir):
    for candidate in (data_dir / spec["folder"], data_dir / spec["archive"]):
        if candidate.exists():
            return candidate
    return None


def _decode(spec, source):
    if source.is_dir():
        return _decode_batches(spec, lambda name: _read_file(source / name), lambda name: source / name)
    try:
        with gzip.open(source) as stream:  # read to the end once, so gzip checks its CRC over every byte
            while stream.read(1 << 24):
                pass
        with tarfile.open(source, "r:gz") as archive:
            members = {Path(m.name).name: m for m in archive.getmembers() if m.isfile()}

            def read(name):
                if name not in members:
                    raise RunError(f"{source} is not a {spec['archive']} archive: it has no '{name}' inside")
                return archive.extractfile(members[name]).read()

            return _decode_batches(spec, read, lambda name: f"{source}:{spec['folder']}/{name}")
    except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
        raise RunError(f"{source} is corrupt or truncated ({e}); delete it and download it again") from None


def _read_file(path):
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise
    except OSError as e:
        raise RunError(f"cannot read {path} ({e.strerror or e})") from None


def _decode_batches(spec, read, describe):
    arrays = {}
    for part in ("train", "test"):
        batches = [_read_batch(spec, name, read, describe(name)) for name in spec[part]]
        arrays[f"x_{part}"] = np.concatenate([b["x"] for b in batches])
        for mode in spec["labels"]:
            arrays[f"y_{part}_{mode}"] = np.concatenate([b[mode] for b in batches])
    return arrays


def _read_batch(spec, name, read, where):
    """One Python-2 pickled batch -> validated arrays; any defect is reported against `where`."""
    try:
        raw = read(name)
    except FileNotFoundError:
        raise RunError(f"{where} is missing; the extracted folder is incomplete") from None
    try:
        batch = pickle.load(io.BytesIO(raw), encoding="latin1")
    except Exception as e:  # a damaged pickle can raise nearly anything
        raise RunError(f"{where} is corrupt: cannot unpickle it ({type(e).__name__}: {e})") from None
    if not isinstance(batch, dict) or "data" not in batch:
        raise RunError(f"{where} is not a CIFAR batch: it has no 'data' entry")
    data = batch["data"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        shape = getattr(data, "shape", None)
        raise RunError(f"{where} is corrupt: 'data' should be uint8 of shape (N, 3072), got {shape}")
    out = {"x": data.reshape(-1, *IMAGE_SHAPE)}
    for mode, key in spec["labels"].items():
        if key not in batch:
            raise RunError(f"{where} is not a CIFAR batch: it has no '{key}' entry")
        labels = np.asarray(batch[key], dtype=np.int64)
        k = spec["n_classes"][mode]
        if labels.shape != (len(data),):
            raise RunError(f"{where} is corrupt: {len(labels)} '{key}' for {len(data)} images")
        if labels.size and (labels.min() < 0 or labels.max() >= k):
            raise RunError(f"{where} is corrupt: '{key}' outside 0..{k - 1}")
        out[mode] = labels
    return out


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
        self.batch_size = min(batch_size, len(images))
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
