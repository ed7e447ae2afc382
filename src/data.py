"""Datasets by name: each is one entry of `DATASETS` that the loader, the stream, the config checks and
the reports read. `load_dataset` -> arrays, `get_dataset` -> the training stream and the validation split;
`load_cifar` and `get_cifar` are the same for the CIFARs, under the names notebooks use.

The CIFAR files are read and checked by `src.datasets.cifar_files`; the decoded arrays are cached beside them
as `.npy`, with a checksum of each, so that later runs load in a fraction of a second (`src.datasets.cache`). The stream
keeps the data on the run's device and draws all its randomness from (seed, epoch, batch), so its
position is its whole state.
"""
import functools
import os
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np

from src.datasets import cache, download
from src.datasets.cifar_files import (  # noqa: F401 (IMAGE_SHAPE, CIFAR10_CLASSES: public here)
    CIFAR10_CLASSES, CIFAR10_FILES, CIFAR100_FILES, IMAGE_SHAPE, CifarFiles, cached_class_names,
)
from src.errors import UsageError
from src.datasets.stream import (  # noqa: F401 (public here, as before the stream had a module of its own)
    SEED_AUGMENT, SEED_ORDER, SEED_SPLIT, TrainStream, channel_mean_std, derive_seed, split_train_valid,
)

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
    arrays = cache.load_cached(name, files, data_dir)
    return ((arrays["x_train"], arrays[f"y_train_{label_mode}"]),
            (arrays["x_test"], arrays[f"y_test_{label_mode}"]))


def _cifar_class_names(name, files, data_dir, label_mode):
    folder, _ = cache.cache_paths(name, files, data_dir)
    return cached_class_names(files, data_dir, folder / cache.CLASS_NAMES)[label_mode]


register_dataset(cifar_dataset("cifar10", CIFAR10_FILES))
register_dataset(cifar_dataset("cifar100", CIFAR100_FILES))


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


