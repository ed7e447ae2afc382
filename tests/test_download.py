"""src.datasets.download through load_cifar, against a local HTTP server: MD5 check, errors, nothing partial left."""
import functools
import hashlib
import http.server
import socket
import threading

import numpy as np
import pytest

from src.datasets import download
from src.datasets.writer import write_cifar
from src.data import load_cifar
from src.datasets.cifar_files import KRIZHEVSKY_URL
from src.errors import RunError
from src.files import TMP_PREFIX

ARCHIVE = "cifar-10-python.tar.gz"


class Handler(http.server.SimpleHTTPRequestHandler):
    requests = []  # replaced per server

    def do_GET(self):
        self.requests.append(self.path)
        super().do_GET()

    def log_message(self, format, *args):  # keep the test output clean
        pass


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """An HTTP server on 127.0.0.1 serving a folder with only a CIFAR-10 archive; yields (url, folder, requests)."""
    folder = tmp_path_factory.mktemp("mirror")
    write_cifar("cifar10", folder, n_train=50, n_test=10, seed=21)
    requests = []
    handler = type("RecordingHandler", (Handler,), {"requests": requests})
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(handler, directory=str(folder)))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", folder, requests
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=10)


@pytest.fixture
def mirror(server, monkeypatch):
    url, folder, requests = server
    monkeypatch.setenv(download.BASE_URL_VARIABLE, url)
    requests.clear()
    return url, folder, requests


@pytest.fixture(autouse=True)
def no_default_data_dir(monkeypatch, tmp_path):
    monkeypatch.delenv("DATA_DIR", raising=False)
    monkeypatch.chdir(tmp_path)  # should anything fall back to ./data, it lands in tmp_path


def leftovers(folder):
    return [p for p in folder.rglob("*") if p.name.startswith(TMP_PREFIX)] if folder.exists() else []


def assert_empty(folder):
    assert not folder.exists() or list(folder.rglob("*")) == [], list(folder.rglob("*"))


def assert_one_line(message):
    assert "\n" not in message and "\r" not in message, f"multi-line error: {message!r}"


def test_download_success(mirror, monkeypatch, tmp_path):
    url, folder, requests = mirror
    served = (folder / ARCHIVE).read_bytes()
    monkeypatch.setitem(download.ARCHIVE_MD5, ARCHIVE, hashlib.md5(served).hexdigest())
    reference_dir = tmp_path / "reference"
    reference_dir.mkdir()
    (reference_dir / ARCHIVE).write_bytes(served)
    expected = load_cifar("cifar10", reference_dir)

    data_dir = tmp_path / "data" / "nested"  # does not exist yet
    (x, y), (xt, yt) = load_cifar("cifar10", data_dir)
    assert requests == [f"/{ARCHIVE}"]
    for got, want in zip((x, y, xt, yt), (*expected[0], *expected[1]), strict=True):
        assert got.dtype == want.dtype
        np.testing.assert_array_equal(got, want)
    assert x.shape == (50, 3, 32, 32) and xt.shape == (10, 3, 32, 32)
    assert (data_dir / ARCHIVE).read_bytes() == served
    assert leftovers(data_dir) == []
    assert (data_dir / "cifar10-cache-v1").is_dir()

    (x2, _), _ = load_cifar("cifar10", data_dir)  # the second load downloads nothing
    np.testing.assert_array_equal(x2, x)
    assert requests == [f"/{ARCHIVE}"]


def test_download_base_url_with_trailing_slash(mirror, monkeypatch, tmp_path):
    url, folder, requests = mirror
    monkeypatch.setenv(download.BASE_URL_VARIABLE, url + "/")
    monkeypatch.setitem(download.ARCHIVE_MD5, ARCHIVE, hashlib.md5((folder / ARCHIVE).read_bytes()).hexdigest())
    load_cifar("cifar10", tmp_path / "data")
    assert requests == [f"/{ARCHIVE}"]


def test_download_wrong_md5(mirror, tmp_path):
    url, _, requests = mirror
    data_dir = tmp_path / "data"
    with pytest.raises(RunError) as excinfo:
        load_cifar("cifar10", data_dir)  # the published MD5 stays: the served file cannot match it
    assert requests == [f"/{ARCHIVE}"]  # it did download, and then refused the file
    message = str(excinfo.value)
    assert_one_line(message)
    assert "MD5" in message
    assert f"{url}/{ARCHIVE}" in message
    assert str(data_dir) in message  # where to put the file by hand
    assert not (data_dir / ARCHIVE).exists()
    assert leftovers(data_dir) == []
    assert_empty(data_dir)


def test_download_unreachable(monkeypatch, tmp_path):
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    monkeypatch.setenv(download.BASE_URL_VARIABLE, url)
    data_dir = tmp_path / "data"
    with pytest.raises(RunError) as excinfo:
        load_cifar("cifar10", data_dir)
    message = str(excinfo.value)
    assert_one_line(message)
    assert f"{url}/{ARCHIVE}" in message
    assert str(data_dir) in message
    assert_empty(data_dir)


def test_download_not_found(mirror, tmp_path):
    url, _, requests = mirror
    data_dir = tmp_path / "data"
    with pytest.raises(RunError) as excinfo:
        load_cifar("cifar100", data_dir)  # the mirror has only CIFAR-10
    assert requests == ["/cifar-100-python.tar.gz"]
    message = str(excinfo.value)
    assert_one_line(message)
    assert f"{url}/cifar-100-python.tar.gz" in message
    assert "not found" in message.lower() or "404" in message
    assert_empty(data_dir)


def test_archive_url_default_and_override(monkeypatch):
    monkeypatch.delenv(download.BASE_URL_VARIABLE, raising=False)
    assert download.archive_url(ARCHIVE) == KRIZHEVSKY_URL + ARCHIVE  # as the CIFAR-10 entry publishes it
    monkeypatch.setenv(download.BASE_URL_VARIABLE, "http://mirror.example/cifar///")
    assert download.archive_url(ARCHIVE) == "http://mirror.example/cifar/" + ARCHIVE


def test_an_archive_no_dataset_publishes_has_no_url_but_a_mirror_s(monkeypatch):
    """download knows no dataset: a name no entry registered is fetched only from an explicit mirror."""
    monkeypatch.delenv(download.BASE_URL_VARIABLE, raising=False)
    with pytest.raises(RunError, match="no dataset entry publishes nothing-9.tar.gz"):
        download.archive_url("nothing-9.tar.gz")
    monkeypatch.setenv(download.BASE_URL_VARIABLE, "http://mirror.example/x")
    assert download.archive_url("nothing-9.tar.gz") == "http://mirror.example/x/nothing-9.tar.gz"
