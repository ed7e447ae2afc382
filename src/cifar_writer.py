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

from src.data import CIFAR10_CLASSES, DATASETS, IMAGE_SHAPE

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


def write_cifar(which, data_dir, n_train=500, n_test=100, seed=0, as_folder=False):
    """Write a `which` data set ("cifar10" or "cifar100") of learnable images into `data_dir`.

    `as_folder` writes the extracted folder instead of the .tar.gz archive. Returns the path written.
    """
    spec = DATASETS[which]
    rng = np.random.default_rng(seed)
    files = {}
    for names, total in ((spec["train"], n_train), (spec["test"], n_test)):
        for i, name in enumerate(names):
            n = total // len(names) + (i < total % len(names))
            files[name] = py2_pickle(_batch_record(which, name, n, rng))
    files.update(_meta_files(which))
    data_dir = Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    if as_folder:
        folder = data_dir / spec["folder"]
        folder.mkdir(exist_ok=True)
        for name, payload in files.items():
            (folder / name).write_bytes(payload)
        return folder
    archive = data_dir / spec["archive"]
    with tarfile.open(archive, "w:gz") as tar:
        for name, payload in files.items():
            info = tarfile.TarInfo(f"{spec['folder']}/{name}")
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


def _meta_files(which):
    if which == "cifar10":
        return {"batches.meta": py2_pickle({"num_cases_per_batch": 10000, "label_names": list(CIFAR10_CLASSES),
                                            "num_vis": 3072})}
    return {"meta": py2_pickle({"fine_label_names": [f"fine_{i}" for i in range(100)],
                                "coarse_label_names": [f"coarse_{i}" for i in range(20)]})}


def main(data_dir, *, dataset="cifar10", n_train=5000, n_test=1000, seed=0, as_folder=False):
    """Write a small learnable CIFAR-format data set into DATA_DIR."""
    path = write_cifar(dataset, data_dir, n_train, n_test, seed, as_folder)
    print(f"wrote {path} ({n_train} training and {n_test} test images)")


if __name__ == "__main__":
    import argh

    argh.dispatch_command(main)
