"""src.data against hostile or damaged files (issue 9): planted pickles never run, the cache is rebuilt
whenever it is not byte for byte what was written, stale temporaries go, a request larger than the data
is refused, an unreadable archive is not called corrupt, and a half-extracted folder never hides an archive."""
import errno
import hashlib
import io
import json
import os
import pickle
import struct
import subprocess
import tarfile
import threading
import time

import numpy as np
import pytest
import torch

from src.datasets import cache
from src.datasets import download
from conftest import one_line_error as one_line
from src.datasets.writer import py2_pickle, write_cifar
from src.data import DATASETS, get_cifar, load_cifar, split_train_valid
from src.errors import RunError, UsageError

N_TRAIN, N_TEST = 50, 10
CIFAR10 = DATASETS["cifar10"]
CACHE = "cifar10-cache-v1"


def assert_same(a, b):
    for u, v in zip((*a[0], *a[1]), (*b[0], *b[1]), strict=True):
        assert u.dtype == v.dtype and u.shape == v.shape
        np.testing.assert_array_equal(u, v)


def write_tar(archive, files):
    with tarfile.open(archive, "w:gz") as tar:
        for name, payload in files.items():
            info = tarfile.TarInfo(f"{CIFAR10['folder']}/{name}")
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """{seed: folder holding the archive of a small CIFAR-10 of that seed}, for seeds 1 and 2."""
    return {seed: write_cifar("cifar10", tmp_path_factory.mktemp(f"seed{seed}"), N_TRAIN, N_TEST, seed=seed).parent
            for seed in (1, 2)}


@pytest.fixture
def reference(sources):
    """What the small CIFAR-10 of seed 1 decodes to."""
    return load_cifar("cifar10", sources[1])


def official_files(sources):
    """{name: bytes} of the small CIFAR-10 of seed 1, in the official format."""
    with tarfile.open(sources[1] / CIFAR10["archive"], "r:gz") as tar:
        return {os.path.basename(m.name): tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}


# --- 1. a batch pickle never runs code --------------------------------------------------------------------


class Call:
    """Pickles as the call `function(*args)`, as a planted batch would."""

    def __init__(self, function, *args):
        self.function, self.args = function, args

    def __reduce__(self):
        return self.function, self.args


def planted_pickle(kind, marker):
    if kind == "os.system":  # inside an otherwise plausible batch
        return pickle.dumps({"data": Call(os.system, f"touch {marker}"), "labels": list(range(10))}, protocol=2)
    if kind == "builtins.eval":  # written opcode by opcode, as a Python-2 file would be
        code = f"open({str(marker)!r}, 'w').close()".encode()
        return (pickle.PROTO + b"\x02" + pickle.GLOBAL + b"builtins\neval\n"
                + pickle.BINUNICODE + struct.pack("<I", len(code)) + code + pickle.TUPLE1 + pickle.REDUCE + pickle.STOP)
    return pickle.dumps(Call(subprocess.call, ["touch", str(marker)]), protocol=4)  # STACK_GLOBAL


@pytest.mark.parametrize("kind", ["os.system", "builtins.eval", "subprocess"])
@pytest.mark.parametrize("where", ["archive", "folder"])
def test_a_planted_batch_pickle_is_refused_and_never_runs(tmp_path, sources, kind, where):
    marker = tmp_path / "ran"
    files = {**official_files(sources), "data_batch_2": planted_pickle(kind, marker)}
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    if where == "archive":
        write_tar(data_dir / CIFAR10["archive"], files)
        named = f"{data_dir / CIFAR10['archive']}:{CIFAR10['folder']}/data_batch_2"
    else:
        (data_dir / CIFAR10["folder"]).mkdir()
        for name, payload in files.items():
            (data_dir / CIFAR10["folder"] / name).write_bytes(payload)
        named = data_dir / CIFAR10["folder"] / "data_batch_2"
    with pytest.raises(RunError) as excinfo:
        load_cifar("cifar10", data_dir)
    assert not marker.exists(), "the planted pickle ran"
    message = one_line(excinfo, named, "refused")
    assert kind.split(".")[-1] in message or "system" in message
    assert not (data_dir / CACHE).exists()


def test_a_numpy_global_outside_the_list_is_refused(cifar10_folder):
    bad = cifar10_folder / "data_batch_1"
    bad.write_bytes(pickle.PROTO + b"\x02" + pickle.GLOBAL + b"numpy\nload\n" + pickle.STOP)
    with pytest.raises(RunError) as excinfo:
        load_cifar("cifar10", cifar10_folder.parent)
    one_line(excinfo, bad, "numpy.load")


@pytest.fixture
def cifar10_folder(tmp_path):
    return write_cifar("cifar10", tmp_path, n_train=N_TRAIN, n_test=N_TEST, seed=7, as_folder=True)


def test_numpy2_spelling_of_the_array_reconstruction_is_read(cifar10_folder):
    expected = load_cifar("cifar10", cifar10_folder.parent)
    for path in cifar10_folder.iterdir():
        raw = path.read_bytes()
        path.write_bytes(raw.replace(b"numpy.core.multiarray\n", b"numpy._core.multiarray\n"))
        assert raw.count(b"numpy.core.multiarray\n") == path.read_bytes().count(b"numpy._core.multiarray\n")
    later = time.time() + 10
    for path in cifar10_folder.iterdir():
        os.utime(path, (later, later))  # a new source: decoded again
    (cifar10_folder.parent / CACHE / "manifest.json").unlink()
    assert_same(load_cifar("cifar10", cifar10_folder.parent), expected)


def test_a_hand_placed_archive_with_another_md5_warns_once_per_build(tmp_path, capsys):
    archive = write_cifar("cifar10", tmp_path, N_TRAIN, N_TEST, seed=1)
    load_cifar("cifar10", tmp_path)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("warning: ")
    assert str(archive) in err and hashlib.md5(archive.read_bytes()).hexdigest() in err
    assert download.ARCHIVE_MD5[CIFAR10["archive"]] in err
    load_cifar("cifar10", tmp_path)  # the cache is used: no hashing, no warning
    assert capsys.readouterr().err == ""
    (tmp_path / CACHE / "manifest.json").unlink()
    load_cifar("cifar10", tmp_path)  # rebuilt from it: said again
    assert "warning: " in capsys.readouterr().err


def test_the_official_md5_a_download_or_a_folder_give_no_warning(tmp_path, capsys, monkeypatch):
    archive = write_cifar("cifar10", tmp_path / "placed", N_TRAIN, N_TEST, seed=1)
    monkeypatch.setitem(download.ARCHIVE_MD5, CIFAR10["archive"], hashlib.md5(archive.read_bytes()).hexdigest())
    load_cifar("cifar10", tmp_path / "placed")
    write_cifar("cifar10", tmp_path / "folder", N_TRAIN, N_TEST, seed=1, as_folder=True)
    load_cifar("cifar10", tmp_path / "folder")
    monkeypatch.undo()

    def fake_download(name, data_dir):  # the real one keeps a file only once its MD5 is the published one
        return write_cifar("cifar10", data_dir, N_TRAIN, N_TEST, seed=1)

    monkeypatch.setattr(download, "download_archive", fake_download)
    (tmp_path / "fetched").mkdir()
    load_cifar("cifar10", tmp_path / "fetched")
    assert capsys.readouterr().err == ""


# --- 9. the cache is trusted only when it is byte for byte what was written --------------------------------


@pytest.fixture
def cached(tmp_path, reference):
    """A CIFAR-10 archive (seed 1) in tmp_path, decoded and cached once."""
    write_cifar("cifar10", tmp_path, N_TRAIN, N_TEST, seed=1)
    assert_same(load_cifar("cifar10", tmp_path), reference)
    return tmp_path / CACHE


def assert_rebuilt(data_dir, reference, before):
    """The load gives the source's arrays, and the cache holds again exactly what it held before."""
    assert_same(load_cifar("cifar10", data_dir), reference)
    after = {p.name: p.read_bytes() for p in (data_dir / CACHE).iterdir() if p.name != "manifest.json"}
    assert after == before
    manifest = json.loads((data_dir / CACHE / "manifest.json").read_text())
    assert set(manifest["sha256"]) == {name[:-4] for name in before}


def cache_files(folder):
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.name != "manifest.json"}


@pytest.mark.parametrize("manifest", [
    "{}", "[]", '"x"', '{"source": 3}', "3", "null", "", "{", "[" * 100000,
    '{"source": [], "lengths": {}, "sha256": {}}',
], ids=["empty_dict", "list", "string", "source_3", "number", "null", "empty_file", "cut", "deep", "no_files"])
def test_a_malformed_manifest_means_a_rebuild(cached, reference, manifest):
    before = cache_files(cached)
    (cached / "manifest.json").write_text(manifest)
    assert_rebuilt(cached.parent, reference, before)


@pytest.mark.parametrize("edit", ["old_format", "lengths_str", "sums_int", "missing_file", "extra_file", "bad_sum"])
def test_a_manifest_with_a_missing_or_mistyped_field_means_a_rebuild(cached, reference, edit):
    before = cache_files(cached)
    manifest = json.loads((cached / "manifest.json").read_text())
    if edit == "old_format":  # as the code before checksums wrote it
        del manifest["sha256"]
    elif edit == "lengths_str":
        manifest["lengths"] = {k: str(v) for k, v in manifest["lengths"].items()}
    elif edit == "sums_int":
        manifest["sha256"]["x_test"] = 3
    elif edit == "missing_file":
        del manifest["sha256"]["y_test_fine"]
    elif edit == "extra_file":
        manifest["lengths"]["x_extra"] = 3
    else:
        manifest["sha256"]["x_train"] = "0" * 64
    (cached / "manifest.json").write_text(json.dumps(manifest))
    assert_rebuilt(cached.parent, reference, before)


@pytest.mark.parametrize("position", [0, 5, 6, 7, 8, 9, 10, 11, 25, 40, 60, 90, 120, 126, 127, 128, -1])
@pytest.mark.parametrize("name", ["x_train", "y_test_fine"])
def test_npy_header_or_body_damage_means_a_rebuild(cached, reference, name, position):
    before = cache_files(cached)
    path = cached / f"{name}.npy"
    raw = bytearray(path.read_bytes())
    raw[position] ^= 0x5A
    path.write_bytes(raw)
    assert_rebuilt(cached.parent, reference, before)


@pytest.mark.parametrize("name", ["x_train", "y_train_fine"])
def test_a_same_length_edited_npy_is_not_trusted(cached, reference, name):
    before = cache_files(cached)
    path = cached / f"{name}.npy"
    array = np.load(path)
    edited = 255 - array if name.startswith("x") else (array + 1) % 10  # other pixels or labels, same shape
    assert edited.dtype == array.dtype and not np.array_equal(edited, array)
    with open(path, "wb") as f:
        np.save(f, edited)
    assert path.stat().st_size == len(before[f"{name}.npy"])
    assert_rebuilt(cached.parent, reference, before)


def test_a_damaged_cache_without_its_source_is_fetched_again(cached, reference, monkeypatch):
    (cached.parent / CIFAR10["archive"]).unlink()
    assert_same(load_cifar("cifar10", cached.parent), reference)  # intact: used without the source
    path = cached / "x_test.npy"
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 1
    path.write_bytes(raw)
    fetched = []

    def fake_download(name, data_dir):
        fetched.append(name)
        return write_cifar("cifar10", data_dir, N_TRAIN, N_TEST, seed=1)

    monkeypatch.setattr(download, "download_archive", fake_download)
    assert_same(load_cifar("cifar10", cached.parent), reference)
    assert fetched == [CIFAR10["archive"]]


def test_cached_arrays_are_writable_numpy_arrays(cached):
    (x, y), (xt, yt) = load_cifar("cifar10", cached.parent)
    for array in (x, y, xt, yt):
        assert array.flags.writeable and array.flags.c_contiguous
    torch.from_numpy(x)  # no "non-writable array" warning on the way into the stream


# --- 12. temporaries of a killed build are deleted, a live build's never ---------------------------------


def test_a_killed_builds_temporaries_go_at_the_next_build(cached, reference):
    stale = [cached / ".tmp-x_train.npy.k1ll3d", cached / ".tmp-manifest.json.abcdef"]
    for path in stale:
        path.write_bytes(b"\0" * 4096)
    (cached / "manifest.json").unlink()  # a build killed mid-way leaves no manifest: the next load rebuilds
    assert_same(load_cifar("cifar10", cached.parent), reference)
    assert not any(path.exists() for path in stale)
    assert sorted(p.name for p in cached.iterdir()) == sorted(
        ["manifest.json", "x_train.npy", "x_test.npy", "y_train_fine.npy", "y_test_fine.npy"])


def test_a_live_builds_temporary_is_left_alone_and_waited_for(tmp_path, reference, capsys):
    write_cifar("cifar10", tmp_path, N_TRAIN, N_TEST, seed=1)
    folder = tmp_path / CACHE
    folder.mkdir()
    live = folder / ".tmp-x_train.npy.l1ve00"
    holding, release, seen, loaded = threading.Event(), threading.Event(), [], []

    def other_build():  # another process's build, between writing a temporary and renaming it
        with cache._build_lock(tmp_path, folder) as locked:
            live.write_bytes(b"being written")
            holding.set()
            release.wait(10)
            seen.append((locked, live.exists()))
            live.unlink()

    builder = threading.Thread(target=other_build)
    builder.start()
    assert holding.wait(10)
    loader = threading.Thread(target=lambda: loaded.append(load_cifar("cifar10", tmp_path)))
    loader.start()
    err, deadline = "", time.monotonic() + 10
    while "waiting for another process" not in err and time.monotonic() < deadline:
        time.sleep(0.01)
        err += capsys.readouterr().err
    assert "waiting for another process" in err and loader.is_alive()
    time.sleep(0.1)  # were it not waiting, it would now be deleting temporaries
    release.set()
    builder.join(10)
    loader.join(10)
    assert seen == [(True, True)]
    assert_same(loaded[0], reference)


def test_two_loads_at_once_decode_once(tmp_path, reference, monkeypatch):
    write_cifar("cifar10", tmp_path, N_TRAIN, N_TEST, seed=1)
    decodes = []
    real_decode = cache.decode

    def counting_decode(spec, source):
        decodes.append(source)
        time.sleep(0.2)  # long enough for the other load to arrive while this one builds
        return real_decode(spec, source)

    monkeypatch.setattr(cache, "decode", counting_decode)
    results = []
    threads = [threading.Thread(target=lambda: results.append(load_cifar("cifar10", tmp_path))) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(20)
    assert len(results) == 2 and len(decodes) == 1
    for result in results:
        assert_same(result, reference)
    assert not [p for p in (tmp_path / CACHE).iterdir() if p.name.startswith(".tmp-")]


def test_without_flock_only_old_temporaries_go(cached, reference, monkeypatch):
    def no_flock(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(cache.fcntl, "flock", no_flock)
    old, fresh = cached / ".tmp-x_train.npy.0ld000", cached / ".tmp-x_test.npy.fr3sh0"
    for path in (old, fresh):
        path.write_bytes(b"\0" * 64)
    hours_ago = time.time() - 2 * cache.STALE_SECONDS
    os.utime(old, (hours_ago, hours_ago))
    (cached / "manifest.json").unlink()
    assert_same(load_cifar("cifar10", cached.parent), reference)
    assert not old.exists() and fresh.exists()


# --- 13a. a batch or a subset larger than the data is refused, not clamped ---------------------------------


def test_batch_size_larger_than_the_training_images_is_refused(data_dir):
    with pytest.raises(UsageError) as excinfo:
        get_cifar("cifar10", False, 501, 0, "cpu", valid_size=100, data_dir=data_dir)
    one_line(excinfo, "--batch_size=501", "500 training images", "--valid_size=100")
    stream, _ = get_cifar("cifar10", False, 500, 0, "cpu", valid_size=100, data_dir=data_dir)
    assert stream.batch_size == 500 and len(stream) == 1


def test_batch_size_larger_than_n_examples_is_refused(data_dir):
    with pytest.raises(UsageError) as excinfo:
        get_cifar("cifar10", False, 64, 0, "cpu", valid_size=100, n_examples=50, data_dir=data_dir)
    one_line(excinfo, "--batch_size=64", "--n_examples=50")


def test_n_examples_larger_than_the_training_images_is_refused(data_dir):
    with pytest.raises(UsageError) as excinfo:
        get_cifar("cifar10", False, 32, 0, "cpu", valid_size=100, n_examples=501, data_dir=data_dir)
    one_line(excinfo, "--n_examples=501", "500", "--valid_size=100")
    with pytest.raises(UsageError):
        split_train_valid(1000, 100, 901, seed=0)
    train, _ = split_train_valid(1000, 100, 900, seed=0)
    assert len(train) == 900


def test_the_batch_check_is_on_the_global_batch_under_ddp(data_dir):
    streams = [get_cifar("cifar10", False, 500, 0, "cpu", valid_size=100, data_dir=data_dir, shard=(rank, 2))[0]
               for rank in (0, 1)]
    (x0, _), (x1, _) = (next(stream.epoch(0)) for stream in streams)
    assert len(x0) == len(x1) == 250  # each rank its half of the one global batch of 500
    assert not {image.numpy().tobytes() for image in x0} & {image.numpy().tobytes() for image in x1}
    for rank in (0, 1):
        with pytest.raises(UsageError):
            get_cifar("cifar10", True, 502, 0, "cpu", valid_size=100, data_dir=data_dir, shard=(rank, 2))


def test_training_with_a_batch_larger_than_the_data_exits_2(train_here, tmp_path):
    result = train_here(tmp_path / "run", "--batch_size=1000")
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "--batch_size=1000" in result.stderr
    assert "Traceback" not in result.stderr


# --- 13b. an archive that cannot be read is not called corrupt --------------------------------------------


def test_a_directory_in_place_of_the_archive_cannot_be_read(tmp_path):
    archive = tmp_path / CIFAR10["archive"]
    archive.mkdir()
    with pytest.raises(RunError) as excinfo:
        load_cifar("cifar10", tmp_path)
    message = one_line(excinfo, archive, "cannot read", "Is a directory")
    assert "corrupt" not in message and "download it again" not in message


def test_a_permission_error_on_the_archive_is_not_corruption(tmp_path, monkeypatch):
    archive = write_cifar("cifar10", tmp_path, N_TRAIN, N_TEST, seed=1)

    def denied(path, *args, **kwargs):  # tests run as root, where chmod 000 does not stop a read
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    monkeypatch.setattr("src.datasets.cifar_files.gzip.open", denied)
    with pytest.raises(RunError) as excinfo:
        load_cifar("cifar10", tmp_path)
    message = one_line(excinfo, f"cannot read {archive} (Permission denied)")
    assert "corrupt" not in message


@pytest.mark.parametrize("garbage", [b"this is not a gzip file\n" * 50, b"\x1f\x8b\x08\x00" + b"\0" * 100],
                         ids=["bad_magic", "bad_deflate"])
def test_damaged_gzip_is_still_called_corrupt(tmp_path, garbage):
    archive = tmp_path / CIFAR10["archive"]
    archive.write_bytes(garbage)
    with pytest.raises(RunError) as excinfo:
        load_cifar("cifar10", tmp_path)
    one_line(excinfo, archive, "corrupt or truncated")


def test_an_unreadable_batch_in_the_folder_is_named(cifar10_folder, tmp_path):
    batch = cifar10_folder / "data_batch_3"
    batch.unlink()
    batch.mkdir()
    (tmp_path / "elsewhere").mkdir()
    with pytest.raises(RunError) as excinfo:
        load_cifar("cifar10", cifar10_folder.parent)
    one_line(excinfo, batch)


# --- 13c. a half-extracted folder never hides a whole archive ---------------------------------------------


def test_an_incomplete_folder_beside_the_archive_is_passed_over(tmp_path, reference):
    write_cifar("cifar10", tmp_path, N_TRAIN, N_TEST, seed=1)
    folder = write_cifar("cifar10", tmp_path, N_TRAIN, N_TEST, seed=2, as_folder=True)
    (folder / "data_batch_4").unlink()
    assert_same(load_cifar("cifar10", tmp_path), reference)
    (folder / "data_batch_4").mkdir()  # a directory where a batch should be is no whole folder either
    (tmp_path / CACHE / "manifest.json").unlink()
    assert_same(load_cifar("cifar10", tmp_path), reference)


def test_a_complete_folder_is_preferred_to_the_archive(tmp_path, sources):
    write_cifar("cifar10", tmp_path, N_TRAIN, N_TEST, seed=1)
    write_cifar("cifar10", tmp_path, N_TRAIN, N_TEST, seed=2, as_folder=True)
    assert_same(load_cifar("cifar10", tmp_path), load_cifar("cifar10", sources[2]))


@pytest.mark.parametrize("missing", ["data_batch_1", "test_batch"])
def test_an_incomplete_folder_alone_names_the_missing_file(cifar10_folder, missing):
    (cifar10_folder / missing).unlink()
    with pytest.raises(RunError) as excinfo:
        load_cifar("cifar10", cifar10_folder.parent)
    one_line(excinfo, cifar10_folder / missing, "missing")


# --- labels that are no integers in range: one line naming the file -------------------------------------


@pytest.mark.parametrize(("labels", "said"), [
    (["a", "b"] * 5, "str"), (None, "NoneType"), ([10**30] * 10, "outside 0..9"), ([-(10**30)] * 10, "outside"),
    ([True] * 10, "bool"), ([1.5] * 10, "float"), ({"a": 1}, "dict"), ("abcdefghij", "str"),
    (np.arange(10, dtype=np.float64), "ndarray"), (np.full(10, 2**63, dtype=np.uint64), "outside"),
], ids=["strings", "none", "huge", "huge_negative", "bools", "floats", "dict", "string", "float_array",
        "uint64_array"])
def test_labels_that_are_no_integers_in_range_are_named(cifar10_folder, labels, said):
    bad = cifar10_folder / "data_batch_2"
    bad.write_bytes(pickle.dumps({"data": np.zeros((10, 3072), np.uint8), "labels": labels}, protocol=3))
    with pytest.raises(RunError) as excinfo:
        load_cifar("cifar10", cifar10_folder.parent)
    one_line(excinfo, bad, "'labels'", said)


def test_labels_as_an_integer_array_and_python3_pickles_are_read(cifar10_folder):
    images = np.random.default_rng(3).integers(0, 256, size=(10, 3072), dtype=np.uint8)
    record = {"data": images, "labels": np.arange(10, dtype=np.int32)}  # numpy 2 pickles spell numpy._core
    (cifar10_folder / "data_batch_2").write_bytes(pickle.dumps(record, protocol=3))
    (x, y), _ = load_cifar("cifar10", cifar10_folder.parent)
    np.testing.assert_array_equal(x[10:20], images.reshape(10, 3, 32, 32))
    np.testing.assert_array_equal(y[10:20], np.arange(10))
    assert y.dtype == np.int64


def test_py2_writer_batches_still_read(cifar10_folder):
    """The restricted unpickler reads what the official files hold: the Python-2 opcodes of the writer."""
    images = np.random.default_rng(4).integers(0, 256, size=(10, 3072), dtype=np.uint8)
    (cifar10_folder / "test_batch").write_bytes(py2_pickle({"data": images, "labels": [3] * 10}))
    _, (xt, yt) = load_cifar("cifar10", cifar10_folder.parent)
    np.testing.assert_array_equal(xt, images.reshape(10, 3, 32, 32))
    assert yt.tolist() == [3] * 10
