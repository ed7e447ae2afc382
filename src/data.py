"""Datasets by name: each is one entry of `DATASETS` that the loader, the stream, the config checks and
the reports read. `load_dataset` -> arrays, `get_dataset` -> the training stream and the validation split;
`load_cifar` and `get_cifar` are the same for the CIFARs, under the names notebooks use.

The CIFAR files are read and checked by `src.cifar_files`; the decoded arrays are cached beside them
as `.npy`, with a checksum of each, so that later runs load in a fraction of a second. The stream
keeps the data on the run's device and draws all its randomness from (seed, epoch, batch), so its
position is its whole state.
"""
import contextlib
import fcntl
import functools
import hashlib
import io
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np

from src import download
from src.cifar_files import (  # noqa: F401 (IMAGE_SHAPE, CIFAR10_CLASSES: public here)
    CIFAR10_CLASSES, CIFAR10_FILES, CIFAR100_FILES, IMAGE_SHAPE, CifarFiles, cached_class_names, decode,
    find_source, identity, is_archive,
)
from src.errors import UsageError
from src.files import TMP_PREFIX, atomic_write, read_json, remove_stale_temporaries, write_json
from src.stream import (  # noqa: F401 (public here, as before the stream had a module of its own)
    SEED_AUGMENT, SEED_ORDER, SEED_SPLIT, TrainStream, channel_mean_std, derive_seed, split_train_valid,
)

CACHE_VERSION = 1  # the folder's name; a manifest without checksums (written before they were) is rebuilt
MANIFEST = "manifest.json"
CLASS_NAMES = "class_names.json"  # in the cache folder, beside the manifest: read once from the meta file
CHECKSUM = "sha256"
STALE_SECONDS = 3600  # without a lock, a temporary untouched this long is no live writer's


@dataclass(frozen=True, kw_only=True)
class Dataset:
    """One dataset: what the loader, the stream, the config checks and the reports know of it.

    `load(data_dir, label_mode)` -> (x_train, y_train), (x_test, y_test): x uint8 (N, *image_shape),
    y int64 (N,). `class_names(data_dir, label_mode)` -> one name per class. `n_classes`: label mode ->
    number of classes, the first mode being the default. `n_train`: the size of the published training
    set (what `valid_size` is checked against). `cifar`: its files, for a dataset in the CIFAR layout.
    """

    name: str
    n_classes: dict
    n_train: int
    load: Callable
    class_names: Callable
    image_shape: tuple = IMAGE_SHAPE
    cifar: CifarFiles | None = None

    def __getitem__(self, key):
        """entry["folder"] is entry.cifar.folder: the CIFAR entries were dicts of these, and older code indexes them."""
        if self.cifar is None or key not in {f.name for f in fields(CifarFiles)}:
            raise KeyError(key)
        return getattr(self.cifar, key)


DATASETS: dict[str, Dataset] = {}


def register_dataset(entry):
    """Add `entry` under its name (a name already taken is refused); -> entry."""
    if entry.name in DATASETS:
        raise ValueError(f"a dataset named '{entry.name}' is already registered")
    if not entry.n_classes:
        raise ValueError(f"dataset '{entry.name}' has no label mode in n_classes")
    DATASETS[entry.name] = entry
    if entry.cifar is not None:
        download.publish(entry.cifar.archive, entry.cifar.md5, entry.cifar.base_url)
    return entry


def dataset_names():
    return sorted(DATASETS)


def dataset_entry(name):
    """The entry registered as `name`; ValueError, listing the registered names, if there is none."""
    try:
        return DATASETS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown dataset '{name}'; use one of {', '.join(dataset_names())}") from None


def _label_mode(entry, label_mode):
    """`label_mode` if `entry` has it; None -> its default (the first)."""
    if label_mode is None:
        return next(iter(entry.n_classes))
    if label_mode not in entry.n_classes:
        raise ValueError(f"{entry.name} has no '{label_mode}' labels; use one of {', '.join(entry.n_classes)}")
    return label_mode


def training_set_size(name):
    return dataset_entry(name).n_train


def n_classes(which, label_mode=None):
    entry = dataset_entry(which)
    return entry.n_classes[_label_mode(entry, label_mode)]


def default_data_dir():
    return Path(os.environ.get("DATA_DIR") or "data")


def _data_dir(data_dir):
    return Path(data_dir) if data_dir is not None else default_data_dir()


def class_names(which, label_mode=None, data_dir=None):
    """-> a name per class of `which` under `label_mode`, as its files give them (for reports)."""
    entry = dataset_entry(which)
    label_mode = _label_mode(entry, label_mode)
    names = list(entry.class_names(_data_dir(data_dir), label_mode))
    if len(names) != entry.n_classes[label_mode]:
        raise ValueError(f"dataset '{which}' gave {len(names)} class names for {entry.n_classes[label_mode]} classes")
    return names


def load_dataset(name, data_dir=None, label_mode=None):
    """-> (x_train, y_train), (x_test, y_test) of dataset `name`; x uint8 (N, *image_shape), y int64 (N,).

    `data_dir` defaults to $DATA_DIR, else ./data; `label_mode` to the dataset's first.
    """
    entry = dataset_entry(name)
    label_mode = _label_mode(entry, label_mode)
    return _checked(entry, label_mode, entry.load(_data_dir(data_dir), label_mode))


def load_cifar(which, data_dir=None, label_mode="fine"):
    """-> (x_train, y_train), (x_test, y_test); x uint8 (N, 3, 32, 32), y int64 (N,).

    Reads the official archive or its extracted folder from `data_dir` (default $DATA_DIR, else
    ./data), downloading the archive when neither is there.
    """
    return load_dataset(which, data_dir, label_mode)


def _checked(entry, label_mode, loaded):
    """What a loader returned, once it is what the stream and the model expect: a new dataset's slip is
    named here, not deep in training. Cheap: no pass over the images."""
    n = entry.n_classes[label_mode]
    for part, (x, y) in zip(("train", "test"), loaded, strict=True):
        if not (isinstance(x, np.ndarray) and x.dtype == np.uint8 and x.shape[1:] == tuple(entry.image_shape)):
            raise ValueError(f"dataset '{entry.name}' loaded x_{part} as {_describe(x)}, "
                             f"not uint8 of shape (N, {', '.join(map(str, entry.image_shape))})")
        if not (isinstance(y, np.ndarray) and y.dtype == np.int64 and y.shape == (len(x),)):
            raise ValueError(f"dataset '{entry.name}' loaded y_{part} as {_describe(y)}, "
                             f"not int64 of shape ({len(x)},)")
        if len(y) and not 0 <= y.min() <= y.max() < n:
            raise ValueError(f"dataset '{entry.name}' loaded y_{part} outside 0..{n - 1}")
    return loaded


def _describe(array):
    return f"{array.dtype} of shape {array.shape}" if isinstance(array, np.ndarray) else f"a {type(array).__name__}"


# --- the CIFARs: read from the official archive or folder, cached as .npy ----------------------------------


def cifar_dataset(name, files):
    """The entry of dataset `name`, whose files are in the CIFAR python layout that `files` describes."""
    return Dataset(name=name, n_classes=files.n_classes, n_train=files.n_train, cifar=files,
                   load=functools.partial(_load_cifar_format, name, files),
                   class_names=functools.partial(_cifar_class_names, name, files))


def _load_cifar_format(name, files, data_dir, label_mode):
    arrays = _load_cached(name, files, data_dir)
    return ((arrays["x_train"], arrays[f"y_train_{label_mode}"]),
            (arrays["x_test"], arrays[f"y_test_{label_mode}"]))


def _cifar_class_names(name, files, data_dir, label_mode):
    return cached_class_names(files, data_dir, _cache_paths(name, files, data_dir)[0] / CLASS_NAMES)[label_mode]


register_dataset(cifar_dataset("cifar10", CIFAR10_FILES))
register_dataset(cifar_dataset("cifar100", CIFAR100_FILES))


def _cache_paths(name, files, data_dir):
    folder = data_dir / f"{name}-cache-v{CACHE_VERSION}"
    return folder, ["x_train", "x_test"] + [f"y_{part}_{mode}" for part in ("train", "test") for mode in files.labels]


def _load_cached(name, files, data_dir):
    """The cache if it is whole and matches the source, else the source decoded (and cached).

    The cache is used only if its manifest (written last) matches the source and every file its
    checksum: never half old, half new, never a damaged or edited file.
    """
    folder, names = _cache_paths(name, files, data_dir)
    source = find_source(files, data_dir)
    arrays = _read_cache(folder, names, files, source)
    if arrays is not None:
        return arrays
    downloaded = source is None
    if downloaded:
        source = download.download_archive(files.archive, data_dir)
    with _build_lock(data_dir, folder) as locked:
        arrays = _read_cache(folder, names, files, source)  # built by another process while we waited?
        if arrays is None:
            arrays = _build_cache(folder, names, files, source, locked)
            if not downloaded and is_archive(files, source):  # a download had its MD5 checked already
                download.warn_if_unofficial(source)
    return arrays


def _build_cache(folder, names, files, source, locked):
    arrays = decode(files, source)
    try:
        (folder / MANIFEST).unlink(missing_ok=True)  # first: a build cut short leaves no manifest, so it is redone
        folder.mkdir(exist_ok=True)
        _remove_temporaries(folder, locked)
        sums = {name: _save_npy(folder / f"{name}.npy", arrays[name]) for name in names}
        write_json(folder / MANIFEST, {"source": identity(files, source), "lengths": _lengths(arrays), CHECKSUM: sums})
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


def _read_cache(folder, names, files, source):
    """The cached arrays, or None (rebuild) unless the manifest is whole, matches the source (when there is
    one) and every file its checksum."""
    manifest = _read_manifest(folder, names)
    if manifest is None or (source is not None and manifest["source"] != identity(files, source)):
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


def get_dataset(name, augment, batch_size, seed, device, valid_size=5000, n_examples=-1, label_mode=None,
                data_dir=None, shard=(0, 1)):
    """-> (training stream, (x_valid, y_valid)) on `device`, both from dataset `name`'s training set. Never
    the test set."""
    import torch

    (x, y), _ = load_dataset(name, data_dir, label_mode)
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


def get_cifar(which, augment, batch_size, seed, device, valid_size=5000, n_examples=-1,
              label_mode="fine", data_dir=None, shard=(0, 1)):
    """`get_dataset` under the name the CIFAR code of notebooks calls."""
    return get_dataset(which, augment, batch_size, seed, device, valid_size, n_examples, label_mode, data_dir, shard)


