"""src.data: decoding the official CIFAR pickles, the .npy cache, validation of what is read,
the train/valid split and the training stream (order, resume, augmentation)."""
import io
import os
import pickle
import tarfile

import numpy as np
import pytest
import torch

from src.datasets.writer import py2_pickle, write_cifar
from src.data import (
    DATASETS,
    TrainStream,
    channel_mean_std,
    get_cifar,
    load_cifar,
    split_train_valid,
)
from conftest import one_line_error as assert_one_line_error
from src.errors import RunError

N_TRAIN, N_TEST = 50, 10  # CIFAR-10: 5 training batches of 10 images, one test batch of 10
CIFAR10 = DATASETS["cifar10"]


def assert_loaded_equal(a, b):
    (xa, ya), (xta, yta) = a
    (xb, yb), (xtb, ytb) = b
    for u, v in ((xa, xb), (ya, yb), (xta, xtb), (yta, ytb)):
        assert u.dtype == v.dtype and u.shape == v.shape
        np.testing.assert_array_equal(u, v)


def batch_bytes_from_archive(archive, name):
    with tarfile.open(archive, "r:gz") as tar:
        return tar.extractfile(f"{CIFAR10['folder']}/{name}").read()


def images_and_labels(n, seed=0):
    """(uint8 images of random pixels in 1..255, labels = index): a label tells which image a sample is."""
    rng = np.random.default_rng(seed)
    images = torch.from_numpy(rng.integers(1, 256, size=(n, 3, 32, 32), dtype=np.uint8))
    return images, torch.arange(n, dtype=torch.int64)


def all_batches(stream, epoch, start_batch=0):
    return list(stream.epoch(epoch, start_batch=start_batch))


# --- 1. the fixture data is realistic: Python-2 pickles -------------------------------------------------


@pytest.fixture
def cifar10_folder(tmp_path):
    return write_cifar("cifar10", tmp_path, n_train=N_TRAIN, n_test=N_TEST, seed=7, as_folder=True)


@pytest.mark.parametrize("source", ["archive", "folder"])
def test_written_batches_are_python2_pickles(source, tmp_path):
    if source == "archive":
        archive = write_cifar("cifar10", tmp_path, n_train=N_TRAIN, n_test=N_TEST, seed=3)
        raw = batch_bytes_from_archive(archive, "data_batch_1")
    else:
        folder = write_cifar("cifar10", tmp_path, n_train=N_TRAIN, n_test=N_TEST, seed=3, as_folder=True)
        raw = (folder / "data_batch_1").read_bytes()

    with pytest.raises(UnicodeDecodeError):  # Python 3's default encoding="ASCII" fails, as on the real files
        pickle.loads(raw)
    as_bytes = pickle.loads(raw, encoding="bytes")  # Python-2 str keys come back as bytes
    assert b"data" in as_bytes and b"labels" in as_bytes

    batch = pickle.loads(raw, encoding="latin1")
    assert isinstance(batch, dict) and all(isinstance(k, str) for k in batch)
    assert {"data", "labels"} <= set(batch)
    data = batch["data"]
    assert isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.shape == (N_TRAIN // 5, 3072)
    assert len(batch["labels"]) == N_TRAIN // 5
    assert all(isinstance(v, int) and 0 <= v < 10 for v in batch["labels"])


# --- 2. load_cifar: archive and folder, CIFAR-100 label modes, bad arguments ------------------------------


def check_arrays(loaded, n_train, n_test, n_classes):
    (x, y), (xt, yt) = loaded
    for images, labels, n in ((x, y, n_train), (xt, yt, n_test)):
        assert images.dtype == np.uint8 and images.shape == (n, 3, 32, 32)
        assert labels.dtype == np.int64 and labels.shape == (n,)
        assert labels.min() >= 0 and labels.max() < n_classes


def test_load_cifar10_archive_and_folder_agree(tmp_path):
    archive = write_cifar("cifar10", tmp_path / "a", n_train=N_TRAIN, n_test=N_TEST, seed=5)
    folder = write_cifar("cifar10", tmp_path / "f", n_train=N_TRAIN, n_test=N_TEST, seed=5, as_folder=True)
    from_archive = load_cifar("cifar10", tmp_path / "a")
    from_folder = load_cifar("cifar10", tmp_path / "f")
    check_arrays(from_archive, N_TRAIN, N_TEST, 10)
    check_arrays(from_folder, N_TRAIN, N_TEST, 10)
    assert_loaded_equal(from_archive, from_folder)

    # the arrays are the batches' pixels and labels, in file order, reshaped channel-first
    (x, y), (xt, yt) = from_archive
    expected_x, expected_y = [], []
    for name in CIFAR10["train"]:
        batch = pickle.loads(batch_bytes_from_archive(archive, name), encoding="latin1")
        expected_x.append(batch["data"])
        expected_y += batch["labels"]
    np.testing.assert_array_equal(x, np.concatenate(expected_x).reshape(-1, 3, 32, 32))
    np.testing.assert_array_equal(y, expected_y)
    test_batch = pickle.loads((folder / "test_batch").read_bytes(), encoding="latin1")
    np.testing.assert_array_equal(xt, test_batch["data"].reshape(-1, 3, 32, 32))
    np.testing.assert_array_equal(yt, test_batch["labels"])
    assert len(np.unique(y)) > 1  # the labels vary, so "in range" is not vacuous


def test_different_seeds_give_different_data(tmp_path):
    write_cifar("cifar10", tmp_path / "a", n_train=N_TRAIN, n_test=N_TEST, seed=5)
    write_cifar("cifar10", tmp_path / "b", n_train=N_TRAIN, n_test=N_TEST, seed=6)
    (xa, _), _ = load_cifar("cifar10", tmp_path / "a")
    (xb, _), _ = load_cifar("cifar10", tmp_path / "b")
    assert not np.array_equal(xa, xb)


def test_load_cifar_default_data_dir_is_env_var(data_dir, monkeypatch, tmp_path):
    monkeypatch.setenv("DATA_DIR", str(data_dir))
    monkeypatch.chdir(tmp_path)
    assert_loaded_equal(load_cifar("cifar10"), load_cifar("cifar10", data_dir))


def test_load_cifar100_fine_and_coarse(data_dir):
    fine = load_cifar("cifar100", data_dir, label_mode="fine")
    coarse = load_cifar("cifar100", data_dir, label_mode="coarse")
    default = load_cifar("cifar100", data_dir)
    check_arrays(fine, 600, 100, 100)
    check_arrays(coarse, 600, 100, 20)
    assert_loaded_equal(fine, default)
    (xf, yf), (xtf, ytf) = fine
    (xc, yc), (xtc, ytc) = coarse
    np.testing.assert_array_equal(xf, xc)
    np.testing.assert_array_equal(xtf, xtc)
    np.testing.assert_array_equal(yc, yf // 5)
    np.testing.assert_array_equal(ytc, ytf // 5)
    assert yf.max() >= 20  # fine labels really go beyond the coarse range


def test_unknown_dataset_or_label_mode_raises_value_error(tmp_path):
    with pytest.raises(ValueError, match="cifar1000"):
        load_cifar("cifar1000", tmp_path)
    with pytest.raises(ValueError, match="coarse"):
        load_cifar("cifar10", tmp_path, label_mode="coarse")
    with pytest.raises(ValueError, match="superfine"):
        load_cifar("cifar100", tmp_path, label_mode="superfine")
    assert list(tmp_path.iterdir()) == []  # nothing was downloaded or written


# --- 3. the .npy cache ----------------------------------------------------------------------------------


def test_cache_is_written_and_used_without_the_archive(tmp_path):
    archive = write_cifar("cifar10", tmp_path, n_train=N_TRAIN, n_test=N_TEST, seed=11)
    first = load_cifar("cifar10", tmp_path)
    cache = tmp_path / "cifar10-cache-v1"
    assert cache.is_dir()
    assert sorted(p.name for p in cache.iterdir()) == sorted(
        ["manifest.json", "x_train.npy", "x_test.npy", "y_train_fine.npy", "y_test_fine.npy"])
    archive.unlink()
    second = load_cifar("cifar10", tmp_path)  # no archive, no network: must come from the cache
    assert_loaded_equal(first, second)
    check_arrays(second, N_TRAIN, N_TEST, 10)


def test_cache_is_rebuilt_when_the_source_is_newer(tmp_path):
    write_cifar("cifar10", tmp_path, n_train=N_TRAIN, n_test=N_TEST, seed=11)
    old = load_cifar("cifar10", tmp_path)
    archive = write_cifar("cifar10", tmp_path, n_train=N_TRAIN, n_test=N_TEST, seed=12)
    cache_time = (tmp_path / "cifar10-cache-v1").stat().st_mtime
    os.utime(archive, (cache_time + 10, cache_time + 10))
    new = load_cifar("cifar10", tmp_path)
    assert not np.array_equal(old[0][0], new[0][0])
    archive.unlink()
    assert_loaded_equal(new, load_cifar("cifar10", tmp_path))  # and the cache now holds the new data


def test_cache_without_its_manifest_is_never_trusted(tmp_path):
    """A rebuild stopped half-way (new x, old y) leaves no manifest: the next load rebuilds from the source."""
    write_cifar("cifar10", tmp_path, n_train=N_TRAIN, n_test=N_TEST, seed=11)
    load_cifar("cifar10", tmp_path)
    write_cifar("cifar10", tmp_path, n_train=N_TRAIN, n_test=N_TEST, seed=12)
    (tmp_path / "cifar10-cache-v1" / "manifest.json").unlink()
    direct = load_cifar("cifar10", tmp_path)
    fresh = tmp_path / "fresh"
    write_cifar("cifar10", fresh, n_train=N_TRAIN, n_test=N_TEST, seed=12)
    assert_loaded_equal(direct, load_cifar("cifar10", fresh))


def test_replaced_source_with_the_same_time_invalidates_the_cache(tmp_path):
    archive = write_cifar("cifar10", tmp_path, n_train=N_TRAIN, n_test=N_TEST, seed=11)
    stamp = archive.stat().st_mtime_ns
    old = load_cifar("cifar10", tmp_path)
    write_cifar("cifar10", tmp_path, n_train=N_TRAIN + 10, n_test=N_TEST, seed=12)
    os.utime(archive, ns=(stamp, stamp))  # as `cp -p` or `rsync -a` would leave it
    new = load_cifar("cifar10", tmp_path)
    assert len(new[0][0]) == N_TRAIN + 10 and len(old[0][0]) == N_TRAIN


def test_read_only_data_dir_still_loads(tmp_path, monkeypatch, capsys):
    write_cifar("cifar10", tmp_path, n_train=N_TRAIN, n_test=N_TEST, seed=11)

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr("src.datasets.cache.atomic_write", refuse)
    loaded = load_cifar("cifar10", tmp_path)
    check_arrays(loaded, N_TRAIN, N_TEST, 10)
    assert "cannot cache" in capsys.readouterr().err


@pytest.mark.parametrize("name, keep", [("x_train", "half"), ("y_train_fine", "half"),
                                        ("x_test", "header_part"), ("y_test_fine", "empty")])
def test_damaged_cache_is_rebuilt(tmp_path, name, keep):
    write_cifar("cifar10", tmp_path, n_train=N_TRAIN, n_test=N_TEST, seed=13)
    first = load_cifar("cifar10", tmp_path)
    damaged = tmp_path / "cifar10-cache-v1" / f"{name}.npy"
    size = damaged.stat().st_size
    with open(damaged, "r+b") as f:
        f.truncate({"half": size // 2, "header_part": 20, "empty": 0}[keep])
    second = load_cifar("cifar10", tmp_path)
    assert_loaded_equal(first, second)
    assert damaged.stat().st_size == size  # the cache file was rewritten whole
    (tmp_path / "cifar10-cache-v1" / "y_train_fine.npy").unlink()  # a missing cache file is rebuilt too
    assert_loaded_equal(first, load_cifar("cifar10", tmp_path))


# --- 4. corrupt inputs: one-line RunError naming the file ------------------------------------------------


def assert_no_cache(folder):
    assert not (folder / "cifar10-cache-v1").exists()


def test_truncated_archive(tmp_path):
    archive = write_cifar("cifar10", tmp_path, n_train=N_TRAIN, n_test=N_TEST, seed=1)
    raw = archive.read_bytes()
    archive.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(RunError) as excinfo:
        load_cifar("cifar10", tmp_path)
    assert_one_line_error(excinfo, archive)
    assert_no_cache(tmp_path)


@pytest.mark.parametrize("garbage", [b"", b"this is not a gzip file\n" * 50,
                                     np.random.default_rng(0).bytes(4096)], ids=["empty", "text", "random"])
def test_garbage_archive(tmp_path, garbage):
    archive = tmp_path / CIFAR10["archive"]
    archive.write_bytes(garbage)
    with pytest.raises(RunError) as excinfo:
        load_cifar("cifar10", tmp_path)
    assert_one_line_error(excinfo, archive)
    assert_no_cache(tmp_path)


def test_archive_missing_a_batch(tmp_path):
    folder = write_cifar("cifar10", tmp_path / "src", n_train=N_TRAIN, n_test=N_TEST, seed=1, as_folder=True)
    archive = tmp_path / CIFAR10["archive"]
    with tarfile.open(archive, "w:gz") as tar:
        for path in folder.iterdir():
            if path.name != "data_batch_2":
                tar.add(path, f"{CIFAR10['folder']}/{path.name}")
    with pytest.raises(RunError) as excinfo:
        load_cifar("cifar10", tmp_path)
    assert_one_line_error(excinfo, archive, "data_batch_2")
    assert_no_cache(tmp_path)


def test_garbage_batch_inside_archive(tmp_path):
    folder = write_cifar("cifar10", tmp_path / "src", n_train=N_TRAIN, n_test=N_TEST, seed=1, as_folder=True)
    archive = tmp_path / CIFAR10["archive"]
    with tarfile.open(archive, "w:gz") as tar:
        for path in folder.iterdir():
            payload = np.random.default_rng(1).bytes(3000) if path.name == "test_batch" else path.read_bytes()
            info = tarfile.TarInfo(f"{CIFAR10['folder']}/{path.name}")
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    with pytest.raises(RunError) as excinfo:
        load_cifar("cifar10", tmp_path)
    assert_one_line_error(excinfo, archive, "test_batch")
    assert_no_cache(tmp_path)


@pytest.mark.parametrize("garbage", [np.random.default_rng(2).bytes(5000), b"not a pickle at all\n" * 20, b"",
                                     b"\x80\x02}q\x00(U\x04data"], ids=["random", "text", "empty", "cut_pickle"])
def test_garbage_batch_in_folder(cifar10_folder, garbage):
    bad = cifar10_folder / "data_batch_3"
    bad.write_bytes(garbage)
    with pytest.raises(RunError) as excinfo:
        load_cifar("cifar10", cifar10_folder.parent)
    assert_one_line_error(excinfo, bad)
    assert_no_cache(cifar10_folder.parent)


def labels_list(n, top=10):
    return [i % top for i in range(n)]


@pytest.mark.parametrize("record", [
    {"data": np.zeros((10, 100), np.uint8), "labels": labels_list(10)},  # wrong shape
    {"data": np.zeros(3072 * 10, np.uint8), "labels": labels_list(10)},  # flat
    {"labels": labels_list(10)},  # no data
    {"data": np.zeros((10, 3072), np.uint8)},  # no labels
    {"data": np.zeros((10, 3072), np.uint8), "labels": labels_list(9)},  # too few labels
    {"data": np.zeros((10, 3072), np.uint8), "labels": labels_list(9) + [10]},  # label out of range
    {"data": np.zeros((10, 3072), np.uint8), "labels": [-1] + labels_list(9)},  # negative label
], ids=["data_shape_N_100", "data_flat", "no_data", "no_labels", "label_count", "label_10", "label_-1"])
@pytest.mark.parametrize("name", ["data_batch_2", "test_batch"])
def test_invalid_batch_contents(cifar10_folder, record, name):
    bad = cifar10_folder / name
    bad.write_bytes(py2_pickle(record))
    with pytest.raises(RunError) as excinfo:
        load_cifar("cifar10", cifar10_folder.parent)
    assert_one_line_error(excinfo, bad)
    assert_no_cache(cifar10_folder.parent)


def test_non_dict_pickle_in_folder(cifar10_folder):
    bad = cifar10_folder / "data_batch_1"
    bad.write_bytes(pickle.dumps([1, 2, 3], protocol=2))
    with pytest.raises(RunError) as excinfo:
        load_cifar("cifar10", cifar10_folder.parent)
    assert_one_line_error(excinfo, bad)


def test_valid_handmade_batch_is_accepted(cifar10_folder):
    """The negative tests above are not failing for a reason of their own: a well-formed handmade batch loads."""
    images = np.random.default_rng(3).integers(0, 256, size=(10, 3072), dtype=np.uint8)
    (cifar10_folder / "data_batch_2").write_bytes(py2_pickle({"data": images, "labels": labels_list(10)}))
    (x, y), _ = load_cifar("cifar10", cifar10_folder.parent)
    np.testing.assert_array_equal(x[10:20], images.reshape(10, 3, 32, 32))
    np.testing.assert_array_equal(y[10:20], labels_list(10))


@pytest.mark.parametrize("name", ["data_batch_4", "test_batch"])
def test_folder_missing_a_batch(cifar10_folder, name):
    missing = cifar10_folder / name
    missing.unlink()
    with pytest.raises(RunError) as excinfo:
        load_cifar("cifar10", cifar10_folder.parent)
    assert_one_line_error(excinfo, missing)
    assert_no_cache(cifar10_folder.parent)


def test_cifar100_coarse_label_out_of_range(tmp_path):
    folder = write_cifar("cifar100", tmp_path, n_train=20, n_test=10, seed=1, as_folder=True)
    record = pickle.loads((folder / "train").read_bytes(), encoding="latin1")
    record["coarse_labels"][3] = 20
    (folder / "train").write_bytes(py2_pickle(record))
    with pytest.raises(RunError) as excinfo:
        load_cifar("cifar100", tmp_path, label_mode="fine")  # every label mode is checked, not just the asked one
    assert_one_line_error(excinfo, folder / "train", "coarse_labels")


# --- 5. split_train_valid -------------------------------------------------------------------------------


def test_split_train_valid():
    train, valid = split_train_valid(1000, 100, -1, seed=0)
    assert len(train) == 900 and len(valid) == 100
    assert not set(train.tolist()) & set(valid.tolist())
    assert sorted(train.tolist() + valid.tolist()) == list(range(1000))

    again_train, again_valid = split_train_valid(1000, 100, -1, seed=0)
    np.testing.assert_array_equal(train, again_train)
    np.testing.assert_array_equal(valid, again_valid)

    other_train, other_valid = split_train_valid(1000, 100, -1, seed=1)
    assert set(other_valid.tolist()) != set(valid.tolist())
    assert set(other_train.tolist()) != set(train.tolist())

    assert set(valid.tolist()) != set(range(100))  # a random split, not the first images


def test_split_n_examples_limits_train_only():
    train, valid = split_train_valid(1000, 100, -1, seed=4)
    small_train, small_valid = split_train_valid(1000, 100, 250, seed=4)
    assert len(small_train) == 250
    np.testing.assert_array_equal(small_valid, valid)  # the validation set does not depend on n_examples
    assert set(small_train.tolist()) <= set(train.tolist())
    assert not set(small_train.tolist()) & set(small_valid.tolist())


@pytest.mark.parametrize("valid_size", [1000, 1001])
def test_split_valid_size_too_large(valid_size):
    with pytest.raises(RunError) as excinfo:
        split_train_valid(1000, valid_size, -1, seed=0)
    assert_one_line_error(excinfo, valid_size)


# --- 6. TrainStream -------------------------------------------------------------------------------------


@pytest.mark.parametrize("n, batch_size", [(100, 16), (96, 32), (10, 64)])
def test_stream_length_and_batches(n, batch_size):
    images, labels = images_and_labels(n)
    stream = TrainStream(images, labels, batch_size, seed=0, augment=False, device="cpu")
    b = min(batch_size, n)
    assert len(stream) == n // b
    batches = all_batches(stream, 0)
    assert len(batches) == len(stream)
    for x, y in batches:
        assert x.dtype == torch.uint8 and x.shape == (b, 3, 32, 32)
        assert y.dtype == torch.int64 and y.shape == (b,)
        assert x.device.type == "cpu"


def test_stream_without_augmentation_is_a_permutation():
    images, labels = images_and_labels(100)
    stream = TrainStream(images, labels, 16, seed=0, augment=False, device="cpu")
    seen = []
    for x, y in stream.epoch(0):
        assert torch.equal(x, images[y])  # each image is the dataset's image with that label (= index)
        seen += y.tolist()
    assert len(seen) == len(set(seen)) == 6 * 16  # no image twice in an epoch; the remainder is dropped
    assert seen != sorted(seen)  # shuffled


def test_stream_resume_from_any_batch():
    images, labels = images_and_labels(100)
    for augment in (False, True):
        stream = TrainStream(images, labels, 16, seed=3, augment=augment, device="cpu")
        full = all_batches(stream, 2)
        for k in (0, 1, 4, 5, 6):
            part = all_batches(stream, 2, start_batch=k)
            assert len(part) == len(full) - k
            for (x, y), (fx, fy) in zip(part, full[k:], strict=True):
                assert torch.equal(x, fx) and torch.equal(y, fy)


def test_stream_order_depends_on_epoch_and_seed_only():
    images, labels = images_and_labels(100)
    a = TrainStream(images, labels, 16, seed=5, augment=True, device="cpu")
    b = TrainStream(images.clone(), labels.clone(), 16, seed=5, augment=True, device="cpu")
    other_seed = TrainStream(images, labels, 16, seed=6, augment=True, device="cpu")

    order = {e: torch.cat([y for _, y in a.epoch(e)]) for e in (0, 1)}
    assert not torch.equal(order[0], order[1])
    assert not torch.equal(order[0], torch.cat([y for _, y in other_seed.epoch(0)]))

    list(a.epoch(1))  # iterating other epochs first changes nothing: no hidden state
    for (xa, ya), (xb, yb) in zip(a.epoch(0), b.epoch(0), strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert torch.equal(torch.cat([y for _, y in a.epoch(0)]), order[0])


def window_matches(augmented, original):
    """For each augmented image, the (dy, dx, flipped) with augmented == window of the 4-padded original."""
    padded = torch.nn.functional.pad(original, (4, 4, 4, 4))
    matches = [[] for _ in range(len(augmented))]
    for dy in range(9):
        for dx in range(9):
            window = padded[:, :, dy:dy + 32, dx:dx + 32]
            for flipped, candidate in ((False, window), (True, window.flip(-1))):
                equal = (augmented == candidate).flatten(1).all(1)
                for i in torch.nonzero(equal).flatten().tolist():
                    matches[i].append((dy, dx, flipped))
    return matches


def test_stream_augmentation_is_crop_and_flip():
    images, labels = images_and_labels(128, seed=9)
    stream = TrainStream(images, labels, 64, seed=1, augment=True, device="cpu")
    plain = TrainStream(images, labels, 64, seed=1, augment=False, device="cpu")
    assert len(stream) == 2
    found = []  # per (epoch, batch): the (dy, dx, flipped) of each image
    for epoch in (0, 1):
        for (x, y), (_, plain_y) in zip(stream.epoch(epoch), plain.epoch(epoch), strict=True):
            assert torch.equal(y, plain_y)  # augmentation does not change the order
            assert x.dtype == torch.uint8 and x.shape == (64, 3, 32, 32)
            matches = window_matches(x, images[y])
            for i, m in enumerate(matches):
                assert len(m) == 1, f"image {i} of epoch {epoch} is no crop/flip of its original: {m}"
            found.append([m[0] for m in matches])
    for batch in found:
        assert {f for _, _, f in batch} == {False, True}
        assert len({(dy, dx) for dy, dx, _ in batch}) >= 10
        assert len({dy for dy, _, _ in batch}) >= 3 and len({dx for _, dx, _ in batch}) >= 3
    assert len({tuple(batch) for batch in found}) == 4  # fresh draws for each batch of each epoch


def test_stream_augmentation_reaches_the_extreme_shifts():
    images, labels = images_and_labels(64, seed=10)
    stream = TrainStream(images, labels, 64, seed=2, augment=True, device="cpu")
    shifts = set()
    for epoch in range(4):
        [(x, y)] = all_batches(stream, epoch)
        shifts |= {m[0][:2] for m in window_matches(x, images[y])}
    dys = {dy for dy, _ in shifts}
    dxs = {dx for _, dx in shifts}
    assert dys == set(range(9)) and dxs == set(range(9))


# --- 7. channel_mean_std --------------------------------------------------------------------------------


def test_channel_mean_std_matches_numpy():
    rng = np.random.default_rng(0)
    images = np.stack([rng.integers(0, 256, size=(200, 32, 32)),
                       rng.normal(60, 20, size=(200, 32, 32)).clip(0, 255),
                       rng.integers(200, 210, size=(200, 32, 32))], axis=1).astype(np.uint8)
    mean, std = channel_mean_std(torch.from_numpy(images))
    assert mean.shape == std.shape == (1, 3, 1, 1)
    assert mean.dtype == std.dtype == torch.float32
    as64 = images.astype(np.float64)
    np.testing.assert_allclose(mean.flatten().numpy(), as64.mean(axis=(0, 2, 3)), rtol=1e-4)
    np.testing.assert_allclose(std.flatten().numpy(), as64.std(axis=(0, 2, 3)), rtol=1e-4)

    stream = TrainStream(torch.from_numpy(images), torch.zeros(200, dtype=torch.int64), 32, 0, False, "cpu")
    assert torch.equal(stream.mean, mean) and torch.equal(stream.std, std)


# --- 8. get_cifar ---------------------------------------------------------------------------------------


def as_bytes(images):
    return [bytes(image.numpy().tobytes()) for image in images]


def test_get_cifar(data_dir):
    (x_train, y_train), (x_test, _) = load_cifar("cifar10", data_dir)
    stream, (x_valid, y_valid) = get_cifar("cifar10", augment=False, batch_size=32, seed=0, device="cpu",
                                           valid_size=100, data_dir=data_dir)
    assert isinstance(stream, TrainStream)
    assert x_valid.dtype == torch.uint8 and x_valid.shape == (100, 3, 32, 32)
    assert y_valid.dtype == torch.int64 and y_valid.shape == (100,)
    assert len(stream.images) == len(stream.labels) == 600 - 100
    assert len(stream) == 500 // 32

    label_of = {image.tobytes(): label for image, label in zip(x_train, y_train.tolist(), strict=True)}
    assert len(label_of) == 600  # the fixture's images are distinct, so bytes identify them
    stream_images, valid_images = as_bytes(stream.images), as_bytes(x_valid)
    assert not set(stream_images) & set(valid_images)
    assert sorted(stream_images + valid_images) == sorted(label_of)  # together exactly the training set
    test_images = set(as_bytes(torch.from_numpy(x_test)))
    assert not test_images & set(stream_images) and not test_images & set(valid_images)
    assert [label_of[b] for b in stream_images] == stream.labels.tolist()
    assert [label_of[b] for b in valid_images] == y_valid.tolist()

    again, (x_valid_again, _) = get_cifar("cifar10", False, 32, 0, "cpu", valid_size=100, data_dir=data_dir)
    assert torch.equal(x_valid_again, x_valid)
    _, (x_valid_other, _) = get_cifar("cifar10", False, 32, 1, "cpu", valid_size=100, data_dir=data_dir)
    assert not torch.equal(x_valid_other, x_valid)


def test_get_cifar_n_examples_and_coarse_labels(data_dir):
    stream, (x_valid, y_valid) = get_cifar("cifar100", augment=True, batch_size=16, seed=2, device="cpu",
                                           valid_size=50, n_examples=120, label_mode="coarse", data_dir=data_dir)
    assert len(stream.images) == 120 and len(stream) == 120 // 16
    assert len(x_valid) == 50
    assert int(stream.labels.max()) < 20 and int(y_valid.max()) < 20
    assert not set(as_bytes(stream.images)) & set(as_bytes(x_valid))


def test_get_cifar_valid_size_too_large(data_dir):
    with pytest.raises(RunError) as excinfo:
        get_cifar("cifar10", False, 32, 0, "cpu", valid_size=600, data_dir=data_dir)
    assert_one_line_error(excinfo, 600)
