"""Fetch a published dataset archive: progress bar, MD5 check, nothing partial left behind.

It knows no dataset: what an archive is (where it is published, its MD5) is a fact of its dataset's entry
in `src.data` (or of `src.datasets.shift_sets`); registering the entry publishes it here, by archive name,
for the download and the check to find.
"""
import hashlib
import os
import sys
from pathlib import Path

from src.errors import RunError
from src.files import TMP_PREFIX, atomic_write

BASE_URL_VARIABLE = "CIFAR_BASE_URL"  # a mirror, or a test server on 127.0.0.1

# Archive name -> its published MD5 (None: none is published; its reader checks what it holds), base URL and
# the environment variable that overrides the base, from the registered entries (`publish`). Tests put the
# MD5 of the file they serve into ARCHIVE_MD5.
ARCHIVE_MD5 = {}
ARCHIVE_BASE_URL = {}
ARCHIVE_VARIABLE = {}
CHUNK = 1 << 20


def publish(name, md5, base_url, variable=BASE_URL_VARIABLE):
    """Make archive `name` downloadable: fetched from `base_url` + name (or $`variable` + name), kept only if
    its MD5 is `md5` (any file when `md5` is None)."""
    ARCHIVE_MD5[name], ARCHIVE_BASE_URL[name], ARCHIVE_VARIABLE[name] = md5, base_url, variable


def archive_url(name):
    variable = ARCHIVE_VARIABLE.get(name, BASE_URL_VARIABLE)
    base = os.environ.get(variable) or ARCHIVE_BASE_URL.get(name)
    if base is None:
        raise RunError(f"no dataset entry publishes {name}: register its dataset, or set ${variable} to where it is")
    return base.rstrip("/") + "/" + name


def download_archive(name, data_dir):
    """Download `name` into `data_dir`; the file appears only once its MD5 matches."""
    import http.client  # here, not above: they take 20 ms to import, and most runs download nothing
    import urllib.error
    import urllib.request

    from tqdm import tqdm

    data_dir = Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    url = archive_url(name)
    target = data_dir / name
    by_hand = f"download {url} yourself and put it in {data_dir} (or set DATA_DIR)"
    md5 = hashlib.md5()

    def fetch(out):
        with urllib.request.urlopen(url, timeout=60) as response:
            total = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=f"downloading {name}") as bar:
                while chunk := response.read(CHUNK):
                    out.write(chunk)
                    md5.update(chunk)
                    bar.update(len(chunk))
        if ARCHIVE_MD5.get(name) is not None and md5.hexdigest() != ARCHIVE_MD5[name]:
            raise RunError(
                f"downloaded {url} has MD5 {md5.hexdigest()}, expected {ARCHIVE_MD5[name]}; "
                f"nothing was saved; {by_hand}"
            )

    for stale in data_dir.glob(f"{TMP_PREFIX}{name}.*"):  # left by a download killed mid-way
        stale.unlink(missing_ok=True)
    try:
        atomic_write(target, fetch)
    except (urllib.error.URLError, OSError, http.client.HTTPException, ValueError) as e:
        reason = getattr(e, "reason", None) or e
        raise RunError(f"could not download {url} ({reason}); {by_hand}") from None
    return target


def warn_if_unofficial(path):
    """Warn, in one line, when an archive placed by hand is not the published file.

    It is used all the same (every batch in it is checked as it is read), but other bytes mean other data
    than published results were measured on. Called once per cache build, not per run: hashing the
    170 MB of the real archive takes about 0.3 s.
    """
    path = Path(path)
    expected = ARCHIVE_MD5.get(path.name)
    try:
        with open(path, "rb") as f:
            digest = hashlib.file_digest(f, "md5").hexdigest()
    except OSError:
        return  # it was just read whole; a failure now is not worth a second message
    if digest != expected:
        print(f"warning: {path} is not the official {path.name} (MD5 {digest}, published {expected}); "
              "using it as it is", file=sys.stderr)
