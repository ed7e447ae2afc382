"""The distribution-shift test sets (src.datasets.shift_sets): CIFAR-10.1 and CIFAR-10-C in their official layouts, the
checks of what they hold, and their download against a server on 127.0.0.1."""
import functools
import hashlib
import http.server
import os
import pickle
import threading

import numpy as np
import pytest

from conftest import one_line_error as one_line
from shift_files import cifar10c_arrays, write_cifar10_1, write_cifar10c_folder, write_cifar10c_tar
from src.datasets import download
from src.datasets import shift_sets
from src.errors import RunError
from src.files import TMP_PREFIX
from src.datasets.shift_sets import (
    CIFAR10_1_DATA, CIFAR10_1_LABELS, CIFAR10C_ARCHIVE, CORRUPTIONS, Cifar10C, load_cifar10_1,
)


def test_the_corruptions_are_the_papers_15_and_4_held_out():
    assert len(shift_sets.COMMON_CORRUPTIONS) == 15 and len(shift_sets.EXTRA_CORRUPTIONS) == 4
    assert len(set(CORRUPTIONS)) == 19 and "gaussian_noise" in CORRUPTIONS and "saturate" in CORRUPTIONS


def test_cifar10_1_reads_the_official_layout_as_model_input(tmp_path):
    images, labels = write_cifar10_1(tmp_path)
    x, y = load_cifar10_1(tmp_path)
    assert x.dtype == np.uint8 and x.shape == (40, 3, 32, 32) and x.flags.c_contiguous
    assert y.dtype == np.int64 and np.array_equal(y, labels)
    np.testing.assert_array_equal(x, images.transpose(0, 3, 1, 2))  # NHWC -> NCHW, pixel for pixel


def test_cifar10c_from_the_folder_and_from_the_tar_are_the_same(tmp_path):
    arrays = cifar10c_arrays(per_severity=6)
    write_cifar10c_folder(tmp_path / "folder", arrays)
    (tmp_path / "tar").mkdir()
    write_cifar10c_tar(tmp_path / "tar" / CIFAR10C_ARCHIVE, arrays)
    with Cifar10C(tmp_path / "folder") as a, Cifar10C(tmp_path / "tar") as b:
        assert a.folder is not None and b.tar is not None
        assert a.per_severity == b.per_severity == 6
        assert a.labels.dtype == np.int64 and np.array_equal(a.labels, arrays["labels.npy"])
        np.testing.assert_array_equal(a.labels, b.labels)
        for corruption in ("gaussian_noise", "saturate"):
            x = a.images(corruption)
            assert x.shape == (30, 3, 32, 32) and x.dtype == np.uint8
            np.testing.assert_array_equal(x, arrays[f"{corruption}.npy"].transpose(0, 3, 1, 2))
            np.testing.assert_array_equal(x, b.images(corruption))


def test_a_subset_of_corruptions_needs_only_their_files(tmp_path):
    arrays = cifar10c_arrays(corruptions=["fog"])
    write_cifar10c_folder(tmp_path, arrays)
    with Cifar10C(tmp_path, ["fog"]) as source:
        assert source.images("fog").shape == (30, 3, 32, 32)


def test_a_half_extracted_folder_is_named_rather_than_fetched(tmp_path, monkeypatch):
    write_cifar10c_folder(tmp_path, cifar10c_arrays(corruptions=["fog"]))
    monkeypatch.setattr(download, "download_archive", lambda *a: pytest.fail("nothing may be downloaded"))
    with pytest.raises(RunError) as excinfo:
        Cifar10C(tmp_path, ["fog", "snow"])
    one_line(excinfo, "snow.npy", tmp_path / "CIFAR-10-C")


def npy_bytes(array):
    path_free = __import__("io").BytesIO()
    np.save(path_free, array, allow_pickle=True)
    return path_free.getvalue()


class Planted:
    def __reduce__(self):
        return os.system, ("touch PLANTED",)


BAD_DATA = {
    "NCHW, not NHWC": (np.zeros((40, 3, 32, 32), np.uint8), "uint8 of shape (40, 3, 32, 32)"),
    "floats": (np.zeros((40, 32, 32, 3), np.float32), "float32"),
    "a pickle": (np.array([Planted()] * 40, dtype=object), "object"),
}


@pytest.mark.parametrize("case", BAD_DATA)
def test_cifar10_1_in_the_wrong_layout_is_one_line_naming_the_file(tmp_path, case, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_cifar10_1(tmp_path)
    array, fragment = BAD_DATA[case]
    (tmp_path / CIFAR10_1_DATA).write_bytes(npy_bytes(array))
    with pytest.raises(RunError) as excinfo:
        load_cifar10_1(tmp_path)
    assert fragment in one_line(excinfo, tmp_path / CIFAR10_1_DATA)
    assert not (tmp_path / "PLANTED").exists()  # nothing in the file ran


def test_labels_are_checked_for_range_count_and_type(tmp_path):
    write_cifar10_1(tmp_path)
    np.save(tmp_path / CIFAR10_1_LABELS, np.full(40, 10, np.int32))
    with pytest.raises(RunError) as excinfo:
        load_cifar10_1(tmp_path)
    assert "outside 0..9" in one_line(excinfo, CIFAR10_1_DATA)
    np.save(tmp_path / CIFAR10_1_LABELS, np.zeros(39, np.int64))
    with pytest.raises(RunError) as excinfo:
        load_cifar10_1(tmp_path)
    assert "40 images for 39 labels" in one_line(excinfo, tmp_path / CIFAR10_1_DATA)  # before its data is read
    np.save(tmp_path / CIFAR10_1_LABELS, np.zeros(40, np.float64))
    with pytest.raises(RunError) as excinfo:
        load_cifar10_1(tmp_path)
    assert "integers" in one_line(excinfo, tmp_path / CIFAR10_1_LABELS)


def test_truncated_padded_and_non_npy_files_are_named(tmp_path):
    write_cifar10_1(tmp_path)
    whole = (tmp_path / CIFAR10_1_DATA).read_bytes()
    for damaged, fragment in ((whole[:-100], "truncated"), (whole + b"\0" * 10, "header announces"),
                              (b"<html>404</html>", "not a .npy"), (b"", "not a .npy"),
                              (pickle.dumps(Planted()), "not a .npy")):
        (tmp_path / CIFAR10_1_DATA).write_bytes(damaged)
        with pytest.raises(RunError) as excinfo:
            load_cifar10_1(tmp_path)
        assert fragment in one_line(excinfo, tmp_path / CIFAR10_1_DATA)


def test_cifar10c_layout_checks(tmp_path):
    arrays = cifar10c_arrays(corruptions=["fog"])
    write_cifar10c_folder(tmp_path, {**arrays, "labels.npy": arrays["labels.npy"][:-1]})
    with pytest.raises(RunError) as excinfo:
        Cifar10C(tmp_path, ["fog"])
    assert "5 severities" in one_line(excinfo, "labels.npy")
    write_cifar10c_folder(tmp_path, {**arrays, "fog.npy": arrays["fog.npy"][:-5]})
    with pytest.raises(RunError) as excinfo:
        Cifar10C(tmp_path, ["fog"]).images("fog")
    assert "25 images for 30 labels" in one_line(excinfo, "fog.npy")


def test_a_damaged_tar_or_one_without_a_file_is_one_line(tmp_path):
    write_cifar10c_tar(tmp_path / CIFAR10C_ARCHIVE, cifar10c_arrays(corruptions=["fog"]))
    with pytest.raises(RunError) as excinfo:
        Cifar10C(tmp_path, ["snow"])
    one_line(excinfo, "CIFAR-10-C/snow.npy", tmp_path / CIFAR10C_ARCHIVE)
    (tmp_path / CIFAR10C_ARCHIVE).write_bytes(b"not a tar at all" * 100)
    with pytest.raises(RunError) as excinfo:
        Cifar10C(tmp_path, ["fog"])
    one_line(excinfo, tmp_path / CIFAR10C_ARCHIVE)


# --- downloads, from a server on 127.0.0.1 -------------------------------------------------------------------


@pytest.fixture
def server(tmp_path):
    """Serves tmp_path/served; yields (url, folder, the paths requested)."""
    folder = tmp_path / "served"
    folder.mkdir()
    requests = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def do_GET(self):
            requests.append(self.path)
            super().do_GET()

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(folder)))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", folder, requests
    httpd.shutdown()
    httpd.server_close()
    thread.join(timeout=10)


def test_the_official_locations_and_their_overrides(monkeypatch):
    for variable in ("CIFAR10_1_BASE_URL", "CIFAR10C_BASE_URL", download.BASE_URL_VARIABLE):
        monkeypatch.delenv(variable, raising=False)
    assert download.archive_url(CIFAR10_1_DATA) == \
        "https://raw.githubusercontent.com/modestyachts/CIFAR-10.1/master/datasets/cifar10.1_v6_data.npy"
    assert download.archive_url(CIFAR10C_ARCHIVE) == "https://zenodo.org/records/2535967/files/CIFAR-10-C.tar"
    monkeypatch.setenv(download.BASE_URL_VARIABLE, "http://cifar.mirror/")  # a CIFAR mirror moves only the CIFARs
    assert download.archive_url(CIFAR10C_ARCHIVE).startswith("https://zenodo.org/")
    monkeypatch.setenv("CIFAR10C_BASE_URL", "http://c.mirror/x/")
    assert download.archive_url(CIFAR10C_ARCHIVE) == "http://c.mirror/x/CIFAR-10-C.tar"
    assert download.ARCHIVE_MD5[CIFAR10C_ARCHIVE] == "56bf5dcef84df0e2308c6dcbcbbd8499"


def test_cifar10_1_is_downloaded_when_missing(server, tmp_path, monkeypatch):
    url, folder, requests = server
    images, labels = write_cifar10_1(folder)
    monkeypatch.setenv("CIFAR10_1_BASE_URL", url)
    data_dir = tmp_path / "data"
    x, y = load_cifar10_1(data_dir)
    assert sorted(requests) == sorted([f"/{CIFAR10_1_DATA}", f"/{CIFAR10_1_LABELS}"])
    np.testing.assert_array_equal(x, images.transpose(0, 3, 1, 2))
    assert (data_dir / CIFAR10_1_DATA).read_bytes() == (folder / CIFAR10_1_DATA).read_bytes()
    load_cifar10_1(data_dir)
    assert len(requests) == 2  # kept: nothing downloaded twice
    assert not [p for p in data_dir.iterdir() if p.name.startswith(TMP_PREFIX)]


def test_a_downloaded_file_that_fails_its_check_is_deleted(server, tmp_path, monkeypatch):
    url, folder, _ = server
    write_cifar10_1(folder)
    (folder / CIFAR10_1_DATA).write_text("<html>rate limited</html>")
    monkeypatch.setenv("CIFAR10_1_BASE_URL", url)
    data_dir = tmp_path / "data"
    with pytest.raises(RunError) as excinfo:
        load_cifar10_1(data_dir)
    assert "deleted" in one_line(excinfo, data_dir / CIFAR10_1_DATA)
    assert sorted(p.name for p in data_dir.iterdir()) == []


def test_a_missing_file_on_the_server_is_one_line(server, tmp_path, monkeypatch):
    url, _, _ = server
    monkeypatch.setenv("CIFAR10_1_BASE_URL", url)
    with pytest.raises(RunError) as excinfo:
        load_cifar10_1(tmp_path / "data")
    assert "not found" in one_line(excinfo, f"{url}/{CIFAR10_1_DATA}", tmp_path / "data").lower()


def test_cifar10c_tar_is_downloaded_and_md5_checked(server, tmp_path, monkeypatch):
    url, folder, requests = server
    arrays = cifar10c_arrays(corruptions=["fog"])
    write_cifar10c_tar(folder / CIFAR10C_ARCHIVE, arrays)
    monkeypatch.setenv("CIFAR10C_BASE_URL", url)
    with pytest.raises(RunError) as excinfo:  # the published MD5: the served file cannot match it
        Cifar10C(tmp_path / "refused", ["fog"])
    assert "MD5" in one_line(excinfo, f"{url}/{CIFAR10C_ARCHIVE}")
    assert not (tmp_path / "refused" / CIFAR10C_ARCHIVE).exists()
    served = (folder / CIFAR10C_ARCHIVE).read_bytes()
    monkeypatch.setitem(download.ARCHIVE_MD5, CIFAR10C_ARCHIVE, hashlib.md5(served).hexdigest())
    with Cifar10C(tmp_path / "data", ["fog"]) as source:
        np.testing.assert_array_equal(source.images("fog"), arrays["fog.npy"].transpose(0, 3, 1, 2))
    assert (tmp_path / "data" / CIFAR10C_ARCHIVE).read_bytes() == served
    assert requests == [f"/{CIFAR10C_ARCHIVE}"] * 2


def npy_header_claiming(shape, dtype="|u1"):
    """The bytes of a .npy header (version 1.0) announcing `shape` of `dtype`, with no data after it."""
    header = repr({"descr": dtype, "fortran_order": False, "shape": shape}).encode()
    header += b" " * (-(10 + len(header) + 1) % 64) + b"\n"
    return b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header


def test_a_header_announcing_absurd_or_no_images_is_refused_before_any_read(tmp_path):
    """A shape whose byte count overflows int64, 50 million images in a sparse file (a MemoryError before),
    and an empty pair (an IndexError in the calibration before): one line each, naming the file."""
    write_cifar10_1(tmp_path)
    data = tmp_path / CIFAR10_1_DATA
    header = npy_header_claiming((300 + 2**54, 32, 32, 3))
    data.write_bytes(header)
    with data.open("r+b") as f:  # as many bytes as an int64 overflow of the claim would make it
        f.truncate(len(header) + (((300 + 2**54) * 3072) % 2**64))
    with pytest.raises(RunError) as excinfo:
        load_cifar10_1(tmp_path)
    assert "holds 18014398509482284 images" in one_line(excinfo, data)
    sparse = npy_header_claiming((50_000_000, 32, 32, 3))
    data.write_bytes(sparse)
    with data.open("r+b") as f:
        f.truncate(len(sparse) + 50_000_000 * 3072)
    with pytest.raises(RunError) as excinfo:
        load_cifar10_1(tmp_path)
    assert "holds 50000000 images" in one_line(excinfo, data)
    np.save(tmp_path / CIFAR10_1_LABELS, np.zeros(0, np.int32))
    np.save(data, np.zeros((0, 32, 32, 3), np.uint8))
    with pytest.raises(RunError) as excinfo:
        load_cifar10_1(tmp_path)
    assert "holds 0 labels" in one_line(excinfo, CIFAR10_1_LABELS)


def test_a_fifo_in_place_of_a_data_file_is_refused_not_waited_on(tmp_path):
    write_cifar10_1(tmp_path)
    (tmp_path / CIFAR10_1_DATA).unlink()
    os.mkfifo(tmp_path / CIFAR10_1_DATA)
    with pytest.raises(RunError) as excinfo:
        load_cifar10_1(tmp_path)
    assert "not a regular file" in one_line(excinfo, tmp_path / CIFAR10_1_DATA)
    os.mkfifo(tmp_path / CIFAR10C_ARCHIVE)
    with pytest.raises(RunError) as excinfo:
        Cifar10C(tmp_path, ["fog"])
    assert "not a regular file" in one_line(excinfo, tmp_path / CIFAR10C_ARCHIVE)
