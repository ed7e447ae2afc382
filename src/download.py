"""Fetch an official CIFAR archive: progress bar, MD5 check, nothing partial left behind."""
import hashlib
import http.client
import os
import sys
import urllib.error
import urllib.request
from pathlib import Path

from src.errors import RunError
from src.files import TMP_PREFIX, atomic_write

DEFAULT_BASE_URL = "https://www.cs.toronto.edu/~kriz/"
BASE_URL_VARIABLE = "CIFAR_BASE_URL"  # a mirror, or a test server on 127.0.0.1

ARCHIVE_MD5 = {
    "cifar-10-python.tar.gz": "c58f30108f718f92721af3b95e74349a",
    "cifar-100-python.tar.gz": "eb9058c3a382ffc7106e4002c42a8d85",
}
CHUNK = 1 << 20


def archive_url(name):
    base = os.environ.get(BASE_URL_VARIABLE) or DEFAULT_BASE_URL
    return base.rstrip("/") + "/" + name


def download_archive(name, data_dir):
    """Download `name` into `data_dir`; the file appears only once its MD5 matches."""
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
        if md5.hexdigest() != ARCHIVE_MD5[name]:
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
