"""The official CIFAR files -> validated arrays and class names: what each dataset's files are, which
source to read, and reading it.

The batches are Python-2 pickles. Plain unpickling calls whatever a pickle names (`os.system`
included), so a planted batch would run code in every training, evaluation and sweep job. Ours
admits only what the official files hold (dicts, lists, strings, numbers and numpy's array
reconstruction) and refuses anything else before it is called. The meta files that name the classes
are read the same way.
"""
import contextlib
import gzip
import io
import os
import pickle
import tarfile
import zlib
from dataclasses import dataclass

import numpy as np

from src.errors import RunError
from src.files import read_json, write_json

IMAGE_SHAPE = (3, 32, 32)
KRIZHEVSKY_URL = "https://www.cs.toronto.edu/~kriz/"  # where both CIFARs are published
# As the official batches.meta names them: what the test-data writer writes there (the loader reads the file).
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


@dataclass(frozen=True)
class CifarFiles:
    """The files of a dataset in the CIFAR python layout, and what they hold."""

    archive: str  # the published .tar.gz
    folder: str  # the folder it extracts to
    train: tuple  # batch files of the training set, in order
    test: tuple  # batch files of the test set
    labels: dict  # label mode -> the batches' key of its labels
    n_classes: dict  # label mode -> number of classes (the labels are checked against it)
    n_train: int  # training images in the published set
    meta: str  # the file that names the classes
    label_names: dict  # label mode -> the meta file's key of its class names
    md5: str  # of the published archive
    base_url: str = KRIZHEVSKY_URL  # the archive is base_url + archive (or $CIFAR_BASE_URL + archive)


CIFAR10_FILES = CifarFiles(
    archive="cifar-10-python.tar.gz", folder="cifar-10-batches-py",
    train=tuple(f"data_batch_{i}" for i in range(1, 6)), test=("test_batch",),
    labels={"fine": "labels"}, n_classes={"fine": 10}, n_train=50000,
    meta="batches.meta", label_names={"fine": "label_names"}, md5="c58f30108f718f92721af3b95e74349a",
)
CIFAR100_FILES = CifarFiles(
    archive="cifar-100-python.tar.gz", folder="cifar-100-python", train=("train",), test=("test",),
    labels={"fine": "fine_labels", "coarse": "coarse_labels"}, n_classes={"fine": 100, "coarse": 20}, n_train=50000,
    meta="meta", label_names={"fine": "fine_label_names", "coarse": "coarse_label_names"},
    md5="eb9058c3a382ffc7106e4002c42a8d85",
)


def _numpy_reconstruct():
    try:
        from numpy._core.multiarray import _reconstruct  # numpy >= 2
    except ImportError:
        from numpy.core.multiarray import _reconstruct
    return _reconstruct


# The only globals an official batch names (written by numpy 1 under Python 2), plus numpy 2's spelling
# of the same function; each maps to the object we choose, never to one looked up by the pickle's name.
_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"): _numpy_reconstruct(),
    ("numpy._core.multiarray", "_reconstruct"): _numpy_reconstruct(),
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
}


class _Refused(Exception):
    pass


class _BatchUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        try:
            return _ALLOWED[module, name]
        except (KeyError, TypeError):
            raise _Refused(_one_line(f"{module}.{name}")) from None


def _one_line(text, limit=200):
    """Text from a file (a pickle's global, an exception about it) made fit for a one-line message."""
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit] + "..."


def is_archive(files, source):
    return source.name == files.archive


def find_source(files, data_dir):
    """The extracted folder if it holds every batch, else the archive; else an incomplete folder (reading it
    names the missing file); None when there is neither. A half-extracted folder never hides a whole archive."""
    folder, archive = data_dir / files.folder, data_dir / files.archive
    try:
        if all((folder / name).is_file() for name in files.train + files.test):
            return folder
        return next((path for path in (archive, folder) if path.exists()), None)
    except OSError as e:  # a data folder we may not look into
        raise RunError(f"cannot read {data_dir} ({e.strerror or e})") from None


def identity(files, source, names=None):
    """Names, sizes and modification times of the source files (in a folder: of `names`, default every
    batch): a changed source invalidates what was cached from it."""
    paths = [source] if is_archive(files, source) else [source / name for name in names or files.train + files.test]
    stats = [(path.name, _stat(path)) for path in paths]
    return [[name, st.st_size, st.st_mtime_ns] for name, st in stats if st is not None]


def _stat(path):
    try:
        return path.stat()
    except OSError:
        return None


@contextlib.contextmanager
def _opened(files, source, check_crc):
    """-> (read(name) -> bytes, where(name) -> what to call that file) over the folder or the archive.

    Damage to an archive, found by whatever reads it, is named in one line; so is a file in the way.
    """
    if not is_archive(files, source):
        yield (lambda name: _read_file(source / name)), (lambda name: source / name)
        return
    try:
        if check_crc:
            with gzip.open(source) as stream:  # read to the end once, so gzip checks its CRC over every byte
                while stream.read(1 << 24):
                    pass
        with tarfile.open(source, "r:gz") as archive:
            members = {os.path.basename(m.name): m for m in archive.getmembers() if m.isfile()}

            def read(name):
                if name not in members:
                    raise RunError(f"{source} is not a {files.archive} archive: it has no '{name}' inside")
                return archive.extractfile(members[name]).read()

            yield read, lambda name: f"{source}:{files.folder}/{name}"
    # BadGzipFile is an OSError, but it means damaged bytes, as the others do: caught before OSError.
    except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as e:
        raise RunError(f"{source} is corrupt or truncated ({_one_line(e)}); delete it and download it again") from None
    except OSError as e:  # the file is not the problem: permissions, a directory in its place, a disk error
        raise RunError(f"cannot read {source} ({e.strerror or e})") from None


def decode(files, source):
    """-> {"x_train", "y_train_<mode>", "x_test", "y_test_<mode>"}: every batch read and checked."""
    with _opened(files, source, check_crc=True) as (read, where):
        arrays = {}
        for part in ("train", "test"):
            batches = [_read_batch(files, read, name, where(name)) for name in getattr(files, part)]
            arrays[f"x_{part}"] = np.concatenate([b["x"] for b in batches])
            for mode in files.labels:
                arrays[f"y_{part}_{mode}"] = np.concatenate([b[mode] for b in batches])
        return arrays


def read_class_names(files, source):
    """-> {label mode: class names}, from the meta file in the folder or archive `source`.

    Read by the same restricted unpickler as the batches: a planted meta file runs nothing either.
    """
    with _opened(files, source, check_crc=False) as (read, where):
        where = where(files.meta)
        try:
            raw = read(files.meta)
        except FileNotFoundError:
            raise RunError(f"{where} is missing; the class names are read from it") from None
        meta = _unpickle(raw, where, "a CIFAR meta file")
    if not isinstance(meta, dict):
        raise RunError(f"{where} is not a CIFAR meta file: it holds a {type(meta).__name__}, not a dict")
    return {mode: _class_names(meta, key, files.n_classes[mode], where) for mode, key in files.label_names.items()}


def cached_class_names(files, data_dir, cache_file):
    """-> {label mode: class names}, from the meta file of the source the arrays are read from (downloaded
    when there is none, as for the arrays); kept in `cache_file` after the first read, since reading it from
    the archive decompresses the whole archive."""
    source = find_source(files, data_dir)
    stamp = None if source is None else identity(files, source, [files.meta])
    names = _read_cached_names(cache_file, stamp, files)
    if names is None:
        if source is None:
            from src.datasets import download

            source = download.download_archive(files.archive, data_dir)
            stamp = identity(files, source)
        names = read_class_names(files, source)
        with contextlib.suppress(OSError):  # a read-only data folder: they are read again next time
            cache_file.parent.mkdir(exist_ok=True)
            write_json(cache_file, {"source": stamp, "names": names})
    return names


def _read_cached_names(path, stamp, files):
    """The cached names if they are whole and were read from this source (from any, when there is none)."""
    try:
        cached = read_json(path)
    except (OSError, ValueError, RecursionError):
        return None
    if not isinstance(cached, dict) or (stamp is not None and cached.get("source") != stamp):
        return None
    names = cached.get("names")
    whole = isinstance(names, dict) and all(
        isinstance(names.get(mode), list) and len(names[mode]) == n and all(type(v) is str for v in names[mode])
        for mode, n in files.n_classes.items())
    return names if whole else None


def _class_names(meta, key, n, where):
    names = meta.get(key)
    if names is None:
        raise RunError(f"{where} is not a CIFAR meta file: it has no '{key}' entry")
    if not isinstance(names, list):
        defect = f"a {type(names).__name__}"
    elif len(names) != n:
        defect = f"{len(names)} of them"
    else:
        defect = next((f"a list holding a {type(v).__name__}" for v in names if type(v) is not str), None)
    if defect:
        raise RunError(f"{where} is corrupt: '{key}' should be a list of {n} class names, got {defect}")
    return names


def _read_file(path):
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise
    except OSError as e:
        raise RunError(f"cannot read {path} ({e.strerror or e})") from None


def _unpickle(raw, where, what="a CIFAR batch"):
    try:
        return _BatchUnpickler(io.BytesIO(raw), encoding="latin1").load()
    except _Refused as e:
        raise RunError(f"{where} is not {what}: its pickle asks for {e}, which no CIFAR file holds; "
                       "refused, nothing in it was run") from None
    except Exception as e:  # a damaged pickle can raise nearly anything
        raise RunError(f"{where} is corrupt: cannot unpickle it ({type(e).__name__}: {_one_line(e)})") from None


def _read_batch(files, read, name, where):
    """One Python-2 pickled batch -> validated arrays; any defect is reported against `where`."""
    try:
        raw = read(name)
    except FileNotFoundError:
        raise RunError(f"{where} is missing; the extracted folder is incomplete") from None
    batch = _unpickle(raw, where)
    if not isinstance(batch, dict) or "data" not in batch:
        raise RunError(f"{where} is not a CIFAR batch: it has no 'data' entry")
    data = batch["data"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        shape = getattr(data, "shape", None)
        raise RunError(f"{where} is corrupt: 'data' should be uint8 of shape (N, 3072), got {_one_line(shape)}")
    out = {"x": data.reshape(-1, *IMAGE_SHAPE)}
    for mode, key in files.labels.items():
        out[mode] = _labels(batch, key, len(data), files.n_classes[mode], where)
    return out


def _labels(batch, key, n, n_classes, where):
    """The labels as int64, once they are known to be n integers in 0..n_classes-1 (checked before the
    conversion, so that strings, None or 10**30 are reported, not raised by numpy)."""
    if key not in batch:
        raise RunError(f"{where} is not a CIFAR batch: it has no '{key}' entry")
    labels = batch[key]
    defect = _label_defect(labels)
    if defect:
        raise RunError(f"{where} is corrupt: '{key}' should be a list of integers, got {defect}")
    if len(labels) != n:
        raise RunError(f"{where} is corrupt: {len(labels)} '{key}' for {n} images")
    if n and (min(labels) < 0 or max(labels) >= n_classes):
        raise RunError(f"{where} is corrupt: '{key}' outside 0..{n_classes - 1}")
    return np.asarray(labels, dtype=np.int64)


def _label_defect(labels):
    """What makes `labels` no list of integers, or None; an integer ndarray is as good as the official list."""
    if isinstance(labels, np.ndarray) and labels.ndim == 1 and labels.dtype.kind in "iu":
        return None
    if not isinstance(labels, list):
        return f"a {type(labels).__name__}"
    for value in labels:
        if type(value) is not int:  # bool included: True is no class
            return f"a list holding a {type(value).__name__}"
    return None
