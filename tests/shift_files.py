"""Small CIFAR-10.1 and CIFAR-10-C files in their official layouts, for the tests (nothing here downloads).

CIFAR-10.1 v6: cifar10.1_v6_data.npy (N, 32, 32, 3) uint8 and cifar10.1_v6_labels.npy (N,) int32, as the
authors' repository ships them. CIFAR-10-C: CIFAR-10-C/<corruption>.npy (5n, 32, 32, 3) uint8, severity 1's
n images first, and CIFAR-10-C/labels.npy (5n,), in the folder or in CIFAR-10-C.tar.
"""
import io
import tarfile

import numpy as np

from src.datasets.shift_sets import CIFAR10_1_DATA, CIFAR10_1_LABELS, CIFAR10C_FOLDER, CORRUPTIONS


def shift_images(n, seed):
    """NHWC uint8 images whose class (0..9) sets their mean brightness: a model can tell them apart a little."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, n)
    images = rng.normal(20 + 22 * labels[:, None, None, None], 25, (n, 32, 32, 3)).clip(0, 255).astype(np.uint8)
    return images, labels


def write_cifar10_1(folder, n=40, seed=7):
    """-> (images NHWC, labels) written as the official files."""
    images, labels = shift_images(n, seed)
    np.save(folder / CIFAR10_1_DATA, images)
    np.save(folder / CIFAR10_1_LABELS, labels.astype(np.int32))
    return images, labels


def cifar10c_arrays(per_severity=6, corruptions=CORRUPTIONS, seed=11):
    """{file name: array} of a CIFAR-10-C with `per_severity` images per severity."""
    images, labels = shift_images(per_severity, seed)
    arrays = {"labels.npy": np.tile(labels, 5).astype(np.uint8)}
    for i, corruption in enumerate(corruptions):
        rng = np.random.default_rng(seed + i)
        noisy = [np.clip(images.astype(int) + rng.integers(-8 * s, 8 * s + 1, images.shape), 0, 255)
                 for s in range(1, 6)]
        arrays[f"{corruption}.npy"] = np.concatenate(noisy).astype(np.uint8)
    return arrays


def write_cifar10c_folder(folder, arrays):
    (folder / CIFAR10C_FOLDER).mkdir(parents=True, exist_ok=True)
    for name, array in arrays.items():
        np.save(folder / CIFAR10C_FOLDER / name, array)


def write_cifar10c_tar(path, arrays):
    with tarfile.open(path, "w") as tar:
        for name, array in arrays.items():
            buffer = io.BytesIO()
            np.save(buffer, array)
            info = tarfile.TarInfo(f"{CIFAR10C_FOLDER}/{name}")
            info.size = buffer.tell()
            buffer.seek(0)
            tar.addfile(info, buffer)
