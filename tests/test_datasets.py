"""Datasets by name (issue 10): the registry in src.data, a toy dataset added through it alone, and the
CIFAR entries' facts and class names read from their meta files."""
import dataclasses
import io
import os
import pickle
import tarfile

import numpy as np
import pytest
import torch

from src.datasets import cifar_files
from src.datasets import download
from conftest import one_line_error as one_line
from src.datasets.writer import py2_pickle, write_cifar
from src.data import (
    DATASETS,
    Dataset,
    class_names,
    dataset_entry,
    dataset_names,
    get_cifar,
    get_dataset,
    load_cifar,
    load_dataset,
    n_classes,
    register_dataset,
    split_train_valid,
    training_set_size,
)
from src.errors import RunError

N_TRAIN, N_TEST = 50, 10
TOY_TRAIN, TOY_TEST = 60, 12
TOY_NAMES = ["circle", "square", "triangle"]


def toy_arrays(n, seed):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(n, 3, 32, 32), dtype=np.uint8), rng.integers(0, 3, size=n).astype(np.int64)


def toy_load(data_dir, label_mode):
    return toy_arrays(TOY_TRAIN, 0), toy_arrays(TOY_TEST, 1)


@pytest.fixture
def toy():
    """A dataset registered as a researcher would add one: an entry and one call, no edit of the loader."""
    entry = register_dataset(Dataset(name="toy", n_classes={"fine": 3}, n_train=TOY_TRAIN, load=toy_load,
                                     class_names=lambda data_dir, label_mode: list(TOY_NAMES)))
    yield entry
    DATASETS.pop("toy")


# --- the registry: a toy dataset through it alone -----------------------------------------------------------


def test_a_toy_dataset_gives_a_stream_and_a_validation_split_as_cifar_does(toy, tmp_path):
    stream, (x_valid, y_valid) = get_dataset("toy", True, 8, 5, "cpu", valid_size=12, data_dir=tmp_path)
    x, y = toy_arrays(TOY_TRAIN, 0)
    train, valid = split_train_valid(TOY_TRAIN, 12, -1, 5)
    assert torch.equal(x_valid, torch.from_numpy(x[np.sort(valid)]))
    assert torch.equal(y_valid, torch.from_numpy(y[np.sort(valid)]))
    assert len(stream) == len(train) // 8
    batches = list(stream.epoch(2))
    assert all(xb.shape == (8, 3, 32, 32) and xb.dtype == torch.uint8 for xb, _ in batches)
    assert all(yb.dtype == torch.int64 and 0 <= yb.min() and yb.max() < 3 for _, yb in batches)
    resumed = list(stream.epoch(2, start_batch=3))  # resumable from its position, as the CIFAR stream is
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(batches[3:], resumed, strict=True))
    assert list(tmp_path.iterdir()) == []  # its loader was asked, nothing of CIFAR's ran


def test_a_toy_dataset_answers_every_question_by_its_entry(toy, tmp_path):
    assert "toy" in dataset_names() and dataset_names() == sorted(dataset_names())
    assert dataset_entry("toy") is toy
    assert n_classes("toy") == 3 and n_classes("toy", "fine") == 3
    assert training_set_size("toy") == TOY_TRAIN
    assert class_names("toy", data_dir=tmp_path) == TOY_NAMES
    (x, y), (xt, yt) = load_dataset("toy", tmp_path)
    assert x.shape == (TOY_TRAIN, 3, 32, 32) and xt.shape == (TOY_TEST, 3, 32, 32)
    assert load_cifar("toy", tmp_path)[0][0].shape == x.shape  # the old name reads any entry too
    with pytest.raises(ValueError, match="coarse"):
        load_dataset("toy", tmp_path, label_mode="coarse")


def test_the_default_label_mode_is_the_entrys_first(tmp_path):
    modes = {"shape": 3, "colour": 2}

    def load(data_dir, label_mode):  # every label is the last class of the mode: which mode was read shows
        (x, _), (xt, _) = toy_arrays(TOY_TRAIN, 0), toy_arrays(TOY_TEST, 1)
        n = modes[label_mode]
        return (x, np.full(len(x), n - 1)), (xt, np.full(len(xt), n - 1))

    register_dataset(Dataset(name="toy_modes", n_classes=modes, n_train=TOY_TRAIN, load=load,
                             class_names=lambda data_dir, label_mode: ["a", "b", "c"][:modes[label_mode]]))
    try:
        assert n_classes("toy_modes") == 3 and n_classes("toy_modes", "colour") == 2
        assert load_dataset("toy_modes", tmp_path)[0][1][0] == 2
        assert load_dataset("toy_modes", tmp_path, "colour")[0][1][0] == 1
        assert class_names("toy_modes", data_dir=tmp_path) == ["a", "b", "c"]
        assert class_names("toy_modes", "colour", tmp_path) == ["a", "b"]
        _, (_, y_valid) = get_dataset("toy_modes", False, 4, 1, "cpu", valid_size=5, data_dir=tmp_path)
        assert y_valid.tolist() == [2] * 5
    finally:
        DATASETS.pop("toy_modes")


@pytest.mark.parametrize(("bad", "said"), [
    (lambda x, y: (x.astype(np.float32), y), "float32"),
    (lambda x, y: (x[:, :, :16], y), "(60, 3, 16, 32)"),
    (lambda x, y: (x, y.astype(np.int32)), "int32"),
    (lambda x, y: (x, y[:-1]), "(59,)"),
    (lambda x, y: (x, y + 3), "outside 0..2"),
    (lambda x, y: (list(x), y), "a list"),
], ids=["float_images", "wrong_shape", "int32_labels", "labels_short", "labels_out_of_range", "not_an_array"])
def test_a_loader_that_breaks_the_contract_is_named(tmp_path, bad, said):
    entry = register_dataset(Dataset(name="broken", n_classes={"fine": 3}, n_train=TOY_TRAIN, class_names=None,
                                     load=lambda data_dir, mode: (bad(*toy_arrays(TOY_TRAIN, 0)), toy_arrays(12, 1))))
    try:
        with pytest.raises(ValueError) as excinfo:
            load_dataset("broken", tmp_path)
        one_line(excinfo, "broken", "train", said)
    finally:
        DATASETS.pop(entry.name)


def test_a_name_already_registered_is_refused(toy):
    cifar10 = DATASETS["cifar10"]
    with pytest.raises(ValueError, match="cifar10"):
        register_dataset(dataclasses.replace(cifar10, n_train=1))
    with pytest.raises(ValueError, match="toy"):
        register_dataset(dataclasses.replace(toy, n_train=1))
    assert DATASETS["cifar10"] is cifar10 and DATASETS["toy"] is toy


def test_an_unknown_dataset_lists_the_registered_ones(toy, tmp_path):
    calls = [lambda: load_dataset("imagenet", tmp_path), lambda: load_cifar("imagenet", tmp_path),
             lambda: get_dataset("imagenet", False, 8, 1, "cpu", data_dir=tmp_path),
             lambda: get_cifar("imagenet", False, 8, 1, "cpu", data_dir=tmp_path),
             lambda: n_classes("imagenet"), lambda: training_set_size("imagenet"),
             lambda: class_names("imagenet", data_dir=tmp_path), lambda: dataset_entry("imagenet")]
    for call in calls:
        with pytest.raises(ValueError) as excinfo:
            call()
        one_line(excinfo, "imagenet", "use one of cifar10, cifar100, toy")
    assert list(tmp_path.iterdir()) == []


def test_n_classes_and_n_train_come_from_the_entries(monkeypatch):
    assert n_classes("cifar10") == 10 and n_classes("cifar100") == 100 and n_classes("cifar100", "coarse") == 20
    assert training_set_size("cifar10") == training_set_size("cifar100") == 50000
    cifar100 = DATASETS["cifar100"]
    monkeypatch.setitem(DATASETS, "cifar100", dataclasses.replace(cifar100, n_train=123,
                                                                  n_classes={"fine": 7, "coarse": 3}))
    assert training_set_size("cifar100") == 123
    assert n_classes("cifar100") == 7 and n_classes("cifar100", "coarse") == 3


def test_the_cifar_entries_hold_their_files_facts():
    for name, files in (("cifar10", cifar_files.CIFAR10_FILES), ("cifar100", cifar_files.CIFAR100_FILES)):
        entry = DATASETS[name]
        assert entry.cifar is files and entry.n_classes == files.n_classes and entry.n_train == files.n_train
        assert entry["archive"] == files.archive and entry["folder"] == files.folder  # indexed as the dicts were
        assert download.ARCHIVE_MD5[files.archive] == files.md5  # what a download is checked against
        assert download.ARCHIVE_BASE_URL[files.archive] == files.base_url
    with pytest.raises(KeyError):
        DATASETS["cifar10"]["no_such_fact"]


def test_registering_a_dataset_in_the_cifar_layout_publishes_its_archive(monkeypatch):
    monkeypatch.delenv(download.BASE_URL_VARIABLE, raising=False)
    for table in ("ARCHIVE_MD5", "ARCHIVE_BASE_URL"):  # copies, so that the published entry goes with the test
        monkeypatch.setattr(download, table, dict(getattr(download, table)))
    from src.data import cifar_dataset

    files = dataclasses.replace(cifar_files.CIFAR10_FILES, archive="cifar-10-copy.tar.gz", md5="0" * 32,
                                base_url="https://mirror.example/data")
    entry = register_dataset(cifar_dataset("cifar10_copy", files))
    try:
        assert download.ARCHIVE_MD5["cifar-10-copy.tar.gz"] == "0" * 32
        assert download.archive_url("cifar-10-copy.tar.gz") == "https://mirror.example/data/cifar-10-copy.tar.gz"
        assert entry.n_classes == {"fine": 10} and training_set_size("cifar10_copy") == 50000
    finally:
        DATASETS.pop("cifar10_copy")


# --- class names: from the meta files, through the restricted unpickler, cached -----------------------------


CUSTOM = {
    "cifar10": {"fine": [f"thing{i}" for i in range(10)]},
    "cifar100": {"fine": [f"kind_{i}" for i in range(100)], "coarse": [f"group_{i}" for i in range(20)]},
}


@pytest.mark.parametrize("as_folder", [False, True], ids=["archive", "folder"])
@pytest.mark.parametrize("which", ["cifar10", "cifar100"])
def test_class_names_are_read_from_the_meta_file(tmp_path, which, as_folder):
    write_cifar(which, tmp_path, N_TRAIN, N_TEST, seed=1, as_folder=as_folder, class_names=CUSTOM[which])
    for mode, names in CUSTOM[which].items():
        assert class_names(which, mode, tmp_path) == names


def test_the_written_meta_files_hold_the_official_shape(tmp_path):
    write_cifar("cifar10", tmp_path, N_TRAIN, N_TEST, seed=1, as_folder=True)
    write_cifar("cifar100", tmp_path, N_TRAIN, N_TEST, seed=1, as_folder=True)
    meta10 = pickle.loads((tmp_path / "cifar-10-batches-py" / "batches.meta").read_bytes(), encoding="latin1")
    assert list(meta10) == ["num_cases_per_batch", "label_names", "num_vis"]
    assert class_names("cifar10", data_dir=tmp_path)[:3] == ["airplane", "automobile", "bird"]
    meta100 = pickle.loads((tmp_path / "cifar-100-python" / "meta").read_bytes(), encoding="latin1")
    assert list(meta100) == ["fine_label_names", "coarse_label_names"]
    assert class_names("cifar100", "coarse", tmp_path) == meta100["coarse_label_names"]
    assert len(set(meta100["fine_label_names"])) == 100


def test_class_names_are_read_once_then_from_the_cache(tmp_path, monkeypatch):
    folder = write_cifar("cifar100", tmp_path, N_TRAIN, N_TEST, seed=1, as_folder=True, class_names=CUSTOM["cifar100"])
    assert class_names("cifar100", "coarse", tmp_path) == CUSTOM["cifar100"]["coarse"]
    reads = []
    real = cifar_files.read_class_names
    monkeypatch.setattr(cifar_files, "read_class_names", lambda *args: reads.append(args) or real(*args))
    assert class_names("cifar100", "fine", tmp_path) == CUSTOM["cifar100"]["fine"]
    assert reads == []  # the second call, and the other label mode, cost no read of the meta file
    renamed = {"fine": [f"new_{i}" for i in range(100)], "coarse": [f"newer_{i}" for i in range(20)]}
    meta = folder / "meta"
    stamp = meta.stat().st_mtime_ns
    meta.write_bytes(py2_pickle({"fine_label_names": renamed["fine"], "coarse_label_names": renamed["coarse"]}))
    os.utime(meta, ns=(stamp + 10**9, stamp + 10**9))
    assert class_names("cifar100", "coarse", tmp_path) == renamed["coarse"]  # a changed meta file is read again
    assert len(reads) == 1


def test_class_names_and_the_arrays_come_from_the_same_source(tmp_path):
    write_cifar("cifar10", tmp_path, N_TRAIN, N_TEST, seed=1, class_names={"fine": [f"a{i}" for i in range(10)]})
    write_cifar("cifar10", tmp_path, N_TRAIN, N_TEST, seed=1, as_folder=True,
                class_names={"fine": [f"f{i}" for i in range(10)]})
    assert class_names("cifar10", data_dir=tmp_path)[0] == "f0"  # the whole folder wins, as for the arrays


def test_load_cifar_needs_no_meta_file(tmp_path):
    folder = write_cifar("cifar10", tmp_path, N_TRAIN, N_TEST, seed=1, as_folder=True)
    (folder / "batches.meta").unlink()
    (x, _), _ = load_cifar("cifar10", tmp_path)
    assert x.shape == (N_TRAIN, 3, 32, 32)
    with pytest.raises(RunError) as excinfo:
        class_names("cifar10", data_dir=tmp_path)
    one_line(excinfo, folder / "batches.meta", "missing")


def tar_folder(folder, archive, replace):
    """`folder` packed as the official archive would be, with `replace` ({name: bytes or None}) applied."""
    with tarfile.open(archive, "w:gz") as tar:
        for path in sorted(folder.iterdir()):
            payload = replace.get(path.name, path.read_bytes())
            if payload is not None:
                info = tarfile.TarInfo(f"{folder.name}/{path.name}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))


DAMAGED_META = {
    "garbage": (np.random.default_rng(0).bytes(300), "corrupt"),
    "empty": (b"", "corrupt"),
    "not_a_dict": (pickle.dumps(["airplane"] * 10, protocol=2), "not a CIFAR meta file"),
    "no_names": (py2_pickle({"num_vis": 3072}), "'label_names'"),
    "nine_names": (py2_pickle({"label_names": [f"c{i}" for i in range(9)]}), "9 of them"),
    "numbers": (py2_pickle({"label_names": list(range(10))}), "int"),
    "missing": (None, "batches.meta"),
}


@pytest.mark.parametrize("as_folder", [False, True], ids=["archive", "folder"])
@pytest.mark.parametrize("damage", list(DAMAGED_META))
def test_a_damaged_or_missing_meta_file_is_one_line_naming_it(tmp_path, damage, as_folder):
    payload, said = DAMAGED_META[damage]
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    folder = write_cifar("cifar10", data_dir if as_folder else tmp_path / "src", N_TRAIN, N_TEST, seed=1,
                         as_folder=True)
    if as_folder:
        named = folder / "batches.meta"
        named.unlink() if payload is None else named.write_bytes(payload)
    else:
        named = data_dir / "cifar-10-python.tar.gz"
        tar_folder(folder, named, {"batches.meta": payload})
    load_cifar("cifar10", data_dir)  # the arrays need no meta file
    with pytest.raises(RunError) as excinfo:
        class_names("cifar10", data_dir=data_dir)
    one_line(excinfo, named, said)


class Call:
    def __init__(self, function, *args):
        self.function, self.args = function, args

    def __reduce__(self):
        return self.function, self.args


@pytest.mark.parametrize("as_folder", [False, True], ids=["archive", "folder"])
def test_a_planted_meta_pickle_is_refused_and_never_runs(tmp_path, as_folder):
    marker = tmp_path / "ran"
    planted = pickle.dumps({"label_names": Call(os.system, f"touch {marker}")}, protocol=2)
    folder = write_cifar("cifar10", tmp_path / "src", N_TRAIN, N_TEST, seed=1, as_folder=True)
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    if as_folder:
        (folder / "batches.meta").write_bytes(planted)
        data_dir = folder.parent
        named = folder / "batches.meta"
    else:
        tar_folder(folder, data_dir / "cifar-10-python.tar.gz", {"batches.meta": planted})
        named = f"{data_dir / 'cifar-10-python.tar.gz'}:cifar-10-batches-py/batches.meta"
    with pytest.raises(RunError) as excinfo:
        class_names("cifar10", data_dir=data_dir)
    assert not marker.exists(), "the planted meta pickle ran"
    one_line(excinfo, named, "refused", "system")


def test_a_damaged_names_cache_is_read_again(tmp_path):
    write_cifar("cifar10", tmp_path, N_TRAIN, N_TEST, seed=1, class_names=CUSTOM["cifar10"])
    assert class_names("cifar10", data_dir=tmp_path) == CUSTOM["cifar10"]["fine"]
    cached = tmp_path / "cifar10-cache-v1" / "class_names.json"
    for damage in ("{", '{"source": [], "names": {"fine": ["x"]}}', "[]", '{"names": {"fine": 3}}'):
        cached.write_text(damage)
        assert class_names("cifar10", data_dir=tmp_path) == CUSTOM["cifar10"]["fine"]


def test_class_names_with_no_source_and_no_cache_are_downloaded_as_the_arrays_are(tmp_path, monkeypatch):
    fetched = []

    def fake_download(name, data_dir):
        fetched.append(name)
        return write_cifar("cifar10", data_dir, N_TRAIN, N_TEST, seed=1, class_names=CUSTOM["cifar10"])

    monkeypatch.setattr(download, "download_archive", fake_download)
    assert class_names("cifar10", data_dir=tmp_path) == CUSTOM["cifar10"]["fine"]
    assert fetched == ["cifar-10-python.tar.gz"]
    (tmp_path / "cifar-10-python.tar.gz").unlink()
    assert class_names("cifar10", data_dir=tmp_path) == CUSTOM["cifar10"]["fine"]  # kept: no second download
    assert fetched == ["cifar-10-python.tar.gz"]
