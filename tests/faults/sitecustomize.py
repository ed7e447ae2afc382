"""Fault injection for the scripts that tests start: put this folder on PYTHONPATH.

SLOW_FSYNC_SECONDS=0.05   every fsync sleeps first, so kills often land in the middle of a write
FAIL_FSYNC_AFTER=N        fsync calls after the first N fail with ENOSPC, as on a full disk
"""
import errno
import os
import time

_fsync = os.fsync
_slow = float(os.environ.get("SLOW_FSYNC_SECONDS", "0") or 0)
_fail_after = int(os.environ.get("FAIL_FSYNC_AFTER", "-1") or -1)
_calls = 0


def _faulty_fsync(fd):
    global _calls
    _calls += 1
    if _fail_after >= 0 and _calls > _fail_after:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    if _slow:
        time.sleep(_slow)
    _fsync(fd)


if _slow or _fail_after >= 0:
    os.fsync = _faulty_fsync
