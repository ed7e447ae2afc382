"""Write small CIFAR-format data sets in the official layout, for tests and the offline demo.

The official batches were written by Python 2's cPickle: byte-string keys and numpy arrays pickled
through `numpy.core.multiarray._reconstruct` with their pixels as a Python-2 `str`. Python 3's
pickle cannot write that, so we emit the same opcodes by hand; a loader that forgets
`encoding="latin1"` fails on these files exactly as it would on the real ones.
"""
import io
import pickle
import struct
import tarfile
from pathlib import Path

import numpy as np

from src.datasets.cifar_files import CIFAR10_CLASSES, CIFAR10_FILES, CIFAR100_FILES, IMAGE_SHAPE

FILES = {"cifar10": CIFAR10_FILES, "cifar100": CIFAR100_FILES}

P = pickle  # opcode constants


def _py2_str(data):
    data = data.encode("latin1") if isinstance(data, str) else bytes(data)
    if len(data) < 256:
        return P.SHORT_BINSTRING + bytes([len(data)]) + data
    return P.BINSTRING + struct.pack("<i", len(data)) + data


def _int(n):
    if 0 <= n < 256:
        return P.BININT1 + bytes([n])
    return P.BININT + struct.pack("<i", n)


def _global(module, name):
    return P.GLOBAL + f"{module}\n{name}\n".encode()


def _uint8_array(array):
    """An ndarray pickled as numpy under Python 2 pickled it."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    dtype = (_global("numpy", "dtype") + _py2_str("u1") + _int(0) + _int(1) + P.TUPLE3 + P.REDUCE
             + P.MARK + _int(3) + _py2_str("|") + P.NONE + P.NONE + P.NONE
             + P.BININT + struct.pack("<i", -1) + P.BININT + struct.pack("<i", -1) + _int(0) + P.TUPLE + P.BUILD)
    shape = P.MARK + b"".join(_int(n) for n in array.shape) + P.TUPLE
    return (_global("numpy.core.multiarray", "_reconstruct") + _global("numpy", "ndarray")
            + _int(0) + P.TUPLE1 + _py2_str("b") + P.TUPLE3 + P.REDUCE
            + P.MARK + _int(1) + shape + dtype + P.NEWFALSE + _py2_str(array.tobytes()) + P.TUPLE + P.BUILD)


def _value(value):
    if isinstance(value, np.ndarray):
        return _uint8_array(value)
    if isinstance(value, str):
        return _py2_str(value)
    if isinstance(value, list):
        return P.EMPTY_LIST + (P.MARK + b"".join(_value(v) for v in value) + P.APPENDS if value else b"")
    if isinstance(value, (int, np.integer)):
        return _int(int(value))
    raise TypeError(f"cannot write {type(value)}")


def py2_pickle(record):
    """A dict of str keys -> protocol-2 pickle bytes as Python 2's cPickle wrote them."""
    items = b"".join(_py2_str(k) + _value(v) for k, v in record.items())
    return P.PROTO + bytes([2]) + P.EMPTY_DICT + P.MARK + items + P.SETITEMS + P.STOP


def learnable_images(labels, n_classes, rng):
    """Images whose class shows in colour and stripe frequency, under noise: learnable, but not at a glance."""
    class_rng = np.random.default_rng(12345)
    colours = class_rng.uniform(40, 215, size=(n_classes, 3))
    freqs = class_rng.uniform(0.2, 1.2, size=n_classes)
    axes = class_rng.integers(0, 2, size=n_classes)
    grid = np.arange(32)
    images = np.empty((len(labels), *IMAGE_SHAPE), dtype=np.uint8)
    for i, c in enumerate(labels):
        stripes = 30 * np.sin(freqs[c] * grid + rng.uniform(0, 2 * np.pi))
        pattern = stripes[None, :] if axes[c] else stripes[:, None]
        colour = colours[c] + rng.normal(0, 45, size=3)  # colour alone separates the classes only in part
        pixels = colour[:, None, None] + pattern[None] + rng.normal(0, 40, size=IMAGE_SHAPE)
        images[i] = np.clip(pixels, 0, 255)
    return images


def write_cifar(which, data_dir, n_train=500, n_test=100, seed=0, as_folder=False, class_names=None):
    """Write a `which` data set ("cifar10" or "cifar100") of learnable images into `data_dir`.

    `as_folder` writes the extracted folder instead of the .tar.gz archive; `class_names` ({label mode:
    names}) replaces the names its meta file gives. Returns the path written.
    """
    files = FILES[which]
    rng = np.random.default_rng(seed)
    payloads = {}
    for names, total in ((files.train, n_train), (files.test, n_test)):
        for i, name in enumerate(names):
            n = total // len(names) + (i < total % len(names))
            payloads[name] = py2_pickle(_batch_record(which, name, n, rng))
    payloads[files.meta] = py2_pickle(_meta_record(which, files, class_names or {}))
    data_dir = Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    if as_folder:
        folder = data_dir / files.folder
        folder.mkdir(exist_ok=True)
        for name, payload in payloads.items():
            (folder / name).write_bytes(payload)
        return folder
    archive = data_dir / files.archive
    with tarfile.open(archive, "w:gz") as tar:
        for name, payload in payloads.items():
            info = tarfile.TarInfo(f"{files.folder}/{name}")
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return archive


def _batch_record(which, name, n, rng):
    if which == "cifar10":
        labels = rng.integers(0, 10, size=n)
        record = {"batch_label": f"{name} of 5", "labels": [int(v) for v in labels]}
    else:
        labels = rng.integers(0, 100, size=n)
        record = {"filenames": [f"img_{i}.png" for i in range(n)], "batch_label": name,
                  "fine_labels": [int(v) for v in labels], "coarse_labels": [int(v) // 5 for v in labels]}
    images = learnable_images(labels, 100 if which == "cifar100" else 10, rng)
    record["data"] = images.reshape(n, -1)
    if which == "cifar10":
        record["filenames"] = [f"img_{i}.png" for i in range(n)]
    return record


def _meta_record(which, files, class_names):
    """The meta file's record: CIFAR-10's official names; for CIFAR-100, made-up names shaped as its real
    ones are (lower-case words joined by underscores: `fine_class_07`), since these images show no apples."""
    names = {mode: list(CIFAR10_CLASSES) if which == "cifar10" else [f"{mode}_class_{i:02d}" for i in range(n)]
             for mode, n in files.n_classes.items()}
    record = {files.label_names[mode]: class_names.get(mode, names[mode]) for mode in files.label_names}
    if which == "cifar10":  # the official batches.meta, key for key
        return {"num_cases_per_batch": 10000, **record, "num_vis": 3072}
    return record


def main(data_dir, *, dataset="cifar10", n_train=5000, n_test=1000, seed=0, as_folder=False):
    """Write a small learnable CIFAR-format data set into DATA_DIR."""
    path = write_cifar(dataset, data_dir, n_train, n_test, seed, as_folder)
    print(f"wrote {path} ({n_train} training and {n_test} test images)")


if __name__ == "__main__":
    import argh

    argh.dispatch_command(main)
