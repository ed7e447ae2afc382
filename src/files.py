"""Crash-safe file writes and the one-process-per-run-folder lock.

A file is either the old version or the new one, never half of each: we write a temporary file
in the same folder, fsync it, rename it over the target and fsync the folder, so that a kill or
power loss at any instant leaves something whole behind.
"""
import errno
import fcntl
import json
import os
import tempfile
import time
from pathlib import Path

from src.errors import RunError

TMP_PREFIX = ".tmp-"
LOCK_FILE = ".lock"
# What writing a file can fail with because of where it goes: full, over quota, too big, failing, read-only.
STORAGE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO, errno.EROFS}
_UMASK = os.umask(0)
os.umask(_UMASK)


def fsync_dir(folder):
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path, write):
    """Call `write(file_object)` on a temporary file, then move it to `path` in one step.

    `write` must write with the file object's own methods, so that a full disk raises OSError.
    Such an error (STORAGE_ERRNOS) names no file: it is raised again naming `path`, so that the
    one-line report says which file could not be written. Other errors (a download's network
    failure inside `write`) pass unchanged.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX + path.name + ".", dir=path.parent)
    os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the permissions open() would
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        if isinstance(e, OSError) and e.filename is None and e.errno in STORAGE_ERRNOS:
            raise OSError(e.errno, e.strerror or os.strerror(e.errno), str(path)) from e
        raise
    fsync_dir(path.parent)


def write_json(path, obj):
    text = json.dumps(obj, indent=2, sort_keys=False) + "\n"
    atomic_write(path, lambda f: f.write(text.encode()))


def read_json(path):
    """The JSON document in `path`. One nested too deeply for Python's parser (a planted `[[[[...`) is a
    ValueError, as any other malformed JSON is, not a RecursionError for every caller to know of."""
    with open(path) as f:
        text = f.read()
    try:
        return json.loads(text)
    except RecursionError:
        raise ValueError(f"{path} is nested too deeply to be read") from None


def remove_stale_temporaries(folder):
    """Temporary files left by a process killed mid-write are never valid: delete them."""
    for stale in Path(folder).glob(TMP_PREFIX + "*"):
        stale.unlink(missing_ok=True)


class RunFolderLock:
    """An exclusive flock on SAVE_PATH/.lock; the kernel drops it when the holder dies, even by kill -9."""

    def __init__(self, folder, kind="run folder"):
        self.path = Path(folder) / LOCK_FILE
        self.kind = kind  # what the refusal calls the folder
        self._fd = None

    def acquire(self, patience=0.5):
        """Take the lock, or raise RunError naming its holder; `patience` outlasts a reader's brief probe."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        deadline = time.monotonic() + patience
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() < deadline:
                    time.sleep(0.05)
                    continue
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise RunError(
                f"{self.kind} {self.path.parent} is in use by process {holder}; "
                "wait for it to finish or stop it first"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        return self

    @staticmethod
    def is_held(folder):
        """True when some process holds the lock of `folder` (the pid in .lock may be reused by another):
        a shared probe, released at once, so a trainer that starts meanwhile waits for it (see acquire)."""
        try:
            fd = os.open(Path(folder) / LOCK_FILE, os.O_RDONLY)
        except OSError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)  # closing drops the shared lock at once
        return False

    def release(self):
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
