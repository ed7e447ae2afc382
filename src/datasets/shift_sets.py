"""Distribution-shift test sets for CIFAR-10 models, read by evaluate.py only (`--test_set`).

CIFAR-10.1 v6 (Recht et al. 2018, "Do CIFAR-10 Classifiers Generalize to CIFAR-10?"): 2,000 new test
images, `cifar10.1_v6_data.npy` (N, 32, 32, 3) uint8 and `cifar10.1_v6_labels.npy` (N,) integers (int32
in the published file), from the repository modestyachts/CIFAR-10.1.

CIFAR-10-C (Hendrycks & Dietterich 2019, "Benchmarking Neural Network Robustness to Common Corruptions and
Perturbations"): the CIFAR-10 test images under 19 corruptions (15 in the benchmark, 4 held out) at 5
severities; `CIFAR-10-C.tar` (Zenodo record 2535967) holds `CIFAR-10-C/<corruption>.npy`, each (5n, 32, 32,
3) uint8 with severity 1's n images first, and `CIFAR-10-C/labels.npy` (5n,); n = 10,000.

Both are read from $DATA_DIR (CIFAR-10-C from its extracted folder or straight from the .tar) and fetched
from where their authors publish them when missing. Every .npy is parsed here, header first: its dtype,
shape and size are checked before any data is read, and no pickle can be in it (object arrays are refused),
so a planted or damaged file is named in one line and runs nothing.
"""
import contextlib
import math
import os
import stat
import tarfile
from pathlib import Path

import numpy as np

from src.datasets import download
from src.datasets.cifar_files import _one_line
from src.errors import RunError

CIFAR10_1_DATA, CIFAR10_1_LABELS = "cifar10.1_v6_data.npy", "cifar10.1_v6_labels.npy"
CIFAR10_1_URL = "https://raw.githubusercontent.com/modestyachts/CIFAR-10.1/master/datasets/"
CIFAR10C_ARCHIVE, CIFAR10C_FOLDER, CIFAR10C_LABELS = "CIFAR-10-C.tar", "CIFAR-10-C", "labels.npy"
CIFAR10C_URL = "https://zenodo.org/records/2535967/files/"
CIFAR10C_MD5 = "56bf5dcef84df0e2308c6dcbcbbd8499"  # as Zenodo lists it
# The benchmark's 15 (noise, blur, weather, digital), then the 4 the paper holds out for validation.
COMMON_CORRUPTIONS = ("gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "glass_blur", "motion_blur",
                      "zoom_blur", "snow", "frost", "fog", "brightness", "contrast", "elastic_transform", "pixelate",
                      "jpeg_compression")
EXTRA_CORRUPTIONS = ("speckle_noise", "gaussian_blur", "spatter", "saturate")
CORRUPTIONS = COMMON_CORRUPTIONS + EXTRA_CORRUPTIONS
SEVERITIES = 5
# The most images (or labels) one file may announce: CIFAR-10-C's hold 50,000, CIFAR-10.1's 2,000. A header
# claiming more (50M images in a sparse file) is refused before anything is read.
MAX_ITEMS = 100_000
N_CLASSES = 10
IMAGE = (32, 32, 3)  # as both sets store them (NHWC); models take (3, 32, 32)

# No MD5 is published for the CIFAR-10.1 files (and the repository rewrote them once, in 2020): what they
# hold is checked as they are read instead, and a download that fails the check is deleted.
download.publish(CIFAR10_1_DATA, None, CIFAR10_1_URL, "CIFAR10_1_BASE_URL")
download.publish(CIFAR10_1_LABELS, None, CIFAR10_1_URL, "CIFAR10_1_BASE_URL")
download.publish(CIFAR10C_ARCHIVE, CIFAR10C_MD5, CIFAR10C_URL, "CIFAR10C_BASE_URL")


def load_cifar10_1(data_dir):
    """-> (x uint8 (N, 3, 32, 32), y int64 (N,)) of CIFAR-10.1 v6, downloading the files that are missing."""
    data_dir = Path(data_dir)
    fetched = [name for name in (CIFAR10_1_DATA, CIFAR10_1_LABELS) if not (data_dir / name).exists()]
    for name in fetched:
        download.download_archive(name, data_dir)
    with _removed_if_bad([data_dir / name for name in fetched]):
        labels = read_npy_file(data_dir / CIFAR10_1_LABELS, images=False)  # first: it says how many images
        images = read_npy_file(data_dir / CIFAR10_1_DATA, images=True, count=len(labels))
        return _as_model_input(images, labels, f"{data_dir / CIFAR10_1_DATA} and {CIFAR10_1_LABELS}")


@contextlib.contextmanager
def _removed_if_bad(downloaded):
    """A file just downloaded that fails its check is deleted, so the next try downloads it again."""
    try:
        yield
    except RunError as e:
        for path in downloaded:
            path.unlink(missing_ok=True)
        if downloaded:
            raise RunError(f"{e}; the downloaded file was deleted") from None
        raise


class Cifar10C:
    """CIFAR-10-C in $DATA_DIR: `labels` (5n,) int64 and `images(corruption)` -> uint8 (5n, 3, 32, 32), from the
    extracted folder when it holds every file asked for, else from the .tar (downloaded when missing)."""

    def __init__(self, data_dir, corruptions=CORRUPTIONS):
        data_dir = Path(data_dir)
        folder, archive = data_dir / CIFAR10C_FOLDER, data_dir / CIFAR10C_ARCHIVE
        names = [CIFAR10C_LABELS] + [f"{c}.npy" for c in corruptions]
        self.folder = folder if all((folder / name).is_file() for name in names) else None
        self.tar = None
        if self.folder is None:
            missing = next((name for name in names if not (folder / name).is_file()), None)
            if folder.is_dir() and not archive.exists():  # half extracted: say so rather than fetch 2.9 GB
                raise RunError(f"{folder} has no {missing}; finish extracting {CIFAR10C_ARCHIVE} there, or put the "
                               f"archive itself in {data_dir}")
            if not archive.exists():
                download.download_archive(CIFAR10C_ARCHIVE, data_dir)
            self.tar = _open_tar(archive)  # with the file it reads, closed by close()
            _check_members(self.tar, names)  # before hours of evaluation, not after
        self.labels = _labels(self._read(CIFAR10C_LABELS, images=False), self._where(CIFAR10C_LABELS))
        if len(self.labels) % SEVERITIES or not len(self.labels):
            raise RunError(f"{self._where(CIFAR10C_LABELS)} holds {len(self.labels)} labels, not {SEVERITIES} "
                           "severities of the same number of images")
        self.per_severity = len(self.labels) // SEVERITIES

    def images(self, corruption):
        images = self._read(f"{corruption}.npy", images=True, count=len(self.labels))
        return np.ascontiguousarray(images.transpose(0, 3, 1, 2))

    def close(self):
        if self.tar is not None:
            self.tar.close()
            self.tar.fileobj.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _where(self, name):
        return str(self.folder / name) if self.folder else f"{self.tar.name}:{CIFAR10C_FOLDER}/{name}"

    def _read(self, name, images, count=None):
        if self.folder is not None:
            return read_npy_file(self.folder / name, images, count)
        try:
            member = self.tar.getmember(f"{CIFAR10C_FOLDER}/{name}")
            stream = self.tar.extractfile(member)
        except KeyError:
            raise RunError(f"{self.tar.name} has no {CIFAR10C_FOLDER}/{name}; is it the official "
                           f"{CIFAR10C_ARCHIVE}?") from None
        except (tarfile.TarError, OSError, EOFError) as e:
            raise RunError(f"cannot read {self._where(name)} ({_one_line(e, 150)})") from None
        if stream is None:
            raise RunError(f"{self._where(name)} is not a regular file")
        with stream:
            return read_npy(stream, member.size, self._where(name), images, count)


def _open_tar(path):
    file = open_regular(path)
    try:
        return tarfile.open(name=str(path), fileobj=file, mode="r:")  # as published: uncompressed, members a seek away
    except (tarfile.TarError, OSError, EOFError) as e:
        file.close()
        raise RunError(f"{path} is not a readable tar archive ({_one_line(e, 150)}); download {CIFAR10C_ARCHIVE} "
                       "again") from None


def _check_members(tar, names):
    try:
        present = set(tar.getnames())
    except (tarfile.TarError, OSError, EOFError) as e:
        raise RunError(f"cannot read {tar.name} ({_one_line(e, 150)}); download {CIFAR10C_ARCHIVE} again") from None
    missing = [name for name in names if f"{CIFAR10C_FOLDER}/{name}" not in present]
    if missing:
        raise RunError(f"{tar.name} has no {CIFAR10C_FOLDER}/{missing[0]}; is it the official {CIFAR10C_ARCHIVE}?")


def open_regular(path):
    """`path` opened for reading if it is a regular file; a FIFO, device or socket (which could block the read
    forever or never end) is refused in one line."""
    try:
        descriptor = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # a FIFO opens at once, without a writer
    except OSError as e:
        raise RunError(f"cannot read {path} ({e.strerror or e})") from None
    if not stat.S_ISREG(os.fstat(descriptor).st_mode):
        os.close(descriptor)
        raise RunError(f"{path} is not a regular file; put the downloaded file there")
    os.set_blocking(descriptor, True)
    return os.fdopen(descriptor, "rb")


def read_npy_file(path, images, count=None):
    try:
        with open_regular(path) as f:
            return read_npy(f, os.fstat(f.fileno()).st_size, str(path), images, count)
    except OSError as e:
        raise RunError(f"cannot read {path} ({e.strerror or e})") from None


def read_npy(stream, size, where, images, count=None):
    """The array in the .npy bytes of `stream` (`size` bytes in all): uint8 (N, 32, 32, 3) images, or (N,)
    integer labels; N between 1 and MAX_ITEMS, and `count` when given (the labels' number, for images).
    Everything is checked from the header before the data is read; the data is read raw, so nothing in the
    file is ever unpickled."""
    try:
        version = np.lib.format.read_magic(stream)
        read_header = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0,
                       (3, 0): np.lib.format.read_array_header_2_0}[version]
        shape, fortran_order, dtype = read_header(stream)
    except (ValueError, KeyError, TypeError, EOFError, SyntaxError) as e:
        raise RunError(f"{where} is not a .npy array file ({_one_line(e, 150)})") from None
    expected = "uint8 of shape (N, 32, 32, 3)" if images else "integers of shape (N,)"
    fits = (dtype == np.uint8 and len(shape) == 4 and tuple(shape[1:]) == IMAGE) if images else \
        (dtype.kind in "iu" and not dtype.hasobject and len(shape) == 1)
    if not fits:
        raise RunError(f"{where} holds {dtype} of shape {tuple(shape)}, not {expected}")
    what = "images" if images else "labels"
    if not 1 <= shape[0] <= MAX_ITEMS:
        raise RunError(f"{where} holds {shape[0]} {what}; a CIFAR-10.1 or CIFAR-10-C file holds 1 to {MAX_ITEMS:,}")
    if count is not None and shape[0] != count:
        raise RunError(f"{where} holds {shape[0]} {what} for {count} labels")
    nbytes = math.prod(shape) * dtype.itemsize  # Python's integers: a forged shape cannot overflow the check
    if stream.tell() + nbytes != size:
        raise RunError(f"{where} is {size} bytes, not the {stream.tell() + nbytes} its header announces "
                       "(truncated or damaged)")
    try:
        data = stream.read(nbytes)
    except MemoryError:
        raise RunError(f"{where}: not enough memory to read its {nbytes:,} bytes") from None
    if len(data) != nbytes:
        raise RunError(f"{where} ends early (truncated)")
    return np.frombuffer(data, dtype).reshape(shape, order="F" if fortran_order else "C")


def _labels(labels, where):
    labels = labels.astype(np.int64)
    if len(labels) and not 0 <= labels.min() <= labels.max() < N_CLASSES:
        raise RunError(f"{where} holds labels outside 0..{N_CLASSES - 1}")
    return labels


def _as_model_input(images, labels, where):
    if len(images) != len(labels):
        raise RunError(f"{where}: {len(images)} images but {len(labels)} labels")
    return np.ascontiguousarray(images.transpose(0, 3, 1, 2)), _labels(labels, where)
