"""The verified cache of decoded CIFAR arrays: DATA_DIR/<name>-cache-v1/ holds one `.npy` per array and a
manifest written last (the source's identity, the lengths, a sha256 of each file), so a later run loads in a
fraction of a second and never reads a cache that is half old, half new, damaged or edited. Building it
takes an exclusive lock, so that DDP ranks and sweep jobs that find it missing at once decode it once.
"""
import contextlib
import fcntl
import hashlib
import io
import math
import os
import sys
import time

import numpy as np

from src.datasets import download
from src.datasets.cifar_files import decode, find_source, identity, is_archive
from src.files import TMP_PREFIX, atomic_write, read_json, remove_stale_temporaries, write_json

CACHE_VERSION = 1  # the folder's name; a manifest without checksums (written before they were) is rebuilt
MANIFEST = "manifest.json"
CLASS_NAMES = "class_names.json"  # in the cache folder, beside the manifest: read once from the meta file
CHECKSUM = "sha256"
STALE_SECONDS = 3600  # without a lock, a temporary untouched this long is no live writer's


def cache_paths(name, files, data_dir):
    folder = data_dir / f"{name}-cache-v{CACHE_VERSION}"
    return folder, ["x_train", "x_test"] + [f"y_{part}_{mode}" for part in ("train", "test") for mode in files.labels]


def load_cached(name, files, data_dir):
    """The cache if it is whole and matches the source, else the source decoded (and cached).

    The cache is used only if its manifest (written last) matches the source and every file its
    checksum: never half old, half new, never a damaged or edited file.
    """
    folder, names = cache_paths(name, files, data_dir)
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
