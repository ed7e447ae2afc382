"""The official CIFAR files -> validated arrays: which source to read, and reading it.

The batches are Python-2 pickles. Plain unpickling calls whatever a pickle names (`os.system`
included), so a planted batch would run code in every training, evaluation and sweep job. Ours
admits only what the official files hold (dicts, lists, strings, numbers and numpy's array
reconstruction) and refuses anything else before it is called.
"""
import gzip
import io
import os
import pickle
import tarfile
import zlib

import numpy as np

from src.errors import RunError

IMAGE_SHAPE = (3, 32, 32)


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


def is_archive(spec, source):
    return source.name == spec["archive"]


def find_source(spec, data_dir):
    """The extracted folder if it holds every batch, else the archive; else an incomplete folder (reading it
    names the missing file); None when there is neither. A half-extracted folder never hides a whole archive."""
    folder, archive = data_dir / spec["folder"], data_dir / spec["archive"]
    try:
        if all((folder / name).is_file() for name in spec["train"] + spec["test"]):
            return folder
        return next((path for path in (archive, folder) if path.exists()), None)
    except OSError as e:  # a data folder we may not look into
        raise RunError(f"cannot read {data_dir} ({e.strerror or e})") from None


def identity(spec, source):
    """Names, sizes and modification times of the source files: a changed source invalidates the cache."""
    files = [source] if is_archive(spec, source) else [source / name for name in spec["train"] + spec["test"]]
    stats = [(path.name, _stat(path)) for path in files]
    return [[name, st.st_size, st.st_mtime_ns] for name, st in stats if st is not None]


def _stat(path):
    try:
        return path.stat()
    except OSError:
        return None


def decode(spec, source):
    """-> {"x_train", "y_train_<mode>", "x_test", "y_test_<mode>"}: every batch read and checked."""
    if not is_archive(spec, source):
        return _decode_batches(spec, lambda name: _read_file(source / name), lambda name: source / name)
    try:
        with gzip.open(source) as stream:  # read to the end once, so gzip checks its CRC over every byte
            while stream.read(1 << 24):
                pass
        with tarfile.open(source, "r:gz") as archive:
            members = {os.path.basename(m.name): m for m in archive.getmembers() if m.isfile()}

            def read(name):
                if name not in members:
                    raise RunError(f"{source} is not a {spec['archive']} archive: it has no '{name}' inside")
                return archive.extractfile(members[name]).read()

            return _decode_batches(spec, read, lambda name: f"{source}:{spec['folder']}/{name}")
    # BadGzipFile is an OSError, but it means damaged bytes, as the others do: caught before OSError.
    except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as e:
        raise RunError(f"{source} is corrupt or truncated ({_one_line(e)}); delete it and download it again") from None
    except OSError as e:  # the file is not the problem: permissions, a directory in its place, a disk error
        raise RunError(f"cannot read {source} ({e.strerror or e})") from None


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


def _unpickle(raw, where):
    try:
        return _BatchUnpickler(io.BytesIO(raw), encoding="latin1").load()
    except _Refused as e:
        raise RunError(f"{where} is not a CIFAR batch: its pickle asks for {e}, which no CIFAR file holds; "
                       "refused, nothing in it was run") from None
    except Exception as e:  # a damaged pickle can raise nearly anything
        raise RunError(f"{where} is corrupt: cannot unpickle it ({type(e).__name__}: {_one_line(e)})") from None


def _read_batch(spec, name, read, where):
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
    for mode, key in spec["labels"].items():
        out[mode] = _labels(batch, key, len(data), spec["n_classes"][mode], where)
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
