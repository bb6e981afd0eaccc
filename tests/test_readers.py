"""Dataset readers chosen by `dataset.reader._target_`: CIFAR-100 and SVHN in torchvision's formats, image
folder trees (decoded once, cached, keyed by the files), torchvision classes by name, a user's callable, and
an exact one-line message for each bad input."""

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from kdrun.data.loading import load_data, transfer_identity
from kdrun.data.readers import build_reader
from kdrun.errors import KdrunError

FINE = [f"fine{i}".encode() for i in range(100)]
COARSE = [f"coarse{i}".encode() for i in range(20)]


def write_cifar100_like(folder, n_train=100, n_test=20, seed=0):
    """torchvision's cifar-100-python: train, test and meta, protocol-2 pickles with bytes keys."""
    rng = np.random.default_rng(seed)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written = {}
    for name, n in (("train", n_train), ("test", n_test)):
        fine = [int(v) for v in rng.integers(0, 100, n)]
        batch = {b"filenames": [f"{i}.png".encode() for i in range(n)], b"batch_label": name.encode(),
                 b"fine_labels": fine, b"coarse_labels": [f // 5 for f in fine],
                 b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8)}
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))
        written[name] = batch
    meta = {b"fine_label_names": FINE, b"coarse_label_names": COARSE}
    (folder / "meta").write_bytes(pickle.dumps(meta, protocol=2))
    return written


def write_svhn_like(folder, n_train=100, n_test=20, seed=0):
    """torchvision's SVHN files: X uint8 [32, 32, 3, N] and y [N, 1] with labels 1..10 (10 is the digit 0)."""
    import scipy.io

    rng = np.random.default_rng(seed)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written = {}
    for split, n in (("train", n_train), ("test", n_test)):
        x = rng.integers(0, 256, (32, 32, 3, n), dtype=np.uint8)
        y = rng.integers(1, 11, (n, 1)).astype(np.uint8)
        scipy.io.savemat(folder / f"{split}_32x32.mat", {"X": x, "y": y})
        written[split] = (x, y)
    return written


def dataset(**node):
    return OmegaConf.create({"name": "d", "limit": None, "test_limit": None, "subset_seed": 0, "mean": 0.5,
                             "std": 0.25, **node})


def test_cifar100_reads_fine_labels_coarse_on_request_and_class_names(tmp_path):
    written = write_cifar100_like(tmp_path / "cifar-100-python")
    for coarse, key, names in ((False, b"fine_labels", FINE), (True, b"coarse_labels", COARSE)):
        reader = build_reader(dataset(reader={"_target_": "kdrun.data.readers.CIFAR100", "coarse": coarse}))
        root = reader.locate(tmp_path, "cifar100", download=False)
        train = reader.read(root, "train")
        assert train.labels.tolist() == written["train"][key] and train.labels.dtype == torch.int64
        assert np.array_equal(train.images.numpy(), written["train"][b"data"].reshape(-1, 3, 32, 32))
        assert reader.count(root, "test") == 20
        assert reader.classes == [n.decode() for n in names]


def test_a_second_load_in_one_process_names_the_classes_as_the_first_did(tmp_path):
    """A pipeline loads the data once per run in one process; the split read once is served again, and
    the dataset's class names with it (not the class numbers)."""
    write_cifar100_like(tmp_path / "cifar-100-python")
    for _ in range(2):
        ds = dataset(name="cifar100", reader={"_target_": "kdrun.data.readers.CIFAR100", "coarse": True, "download": False},
                     shape=[3, 32, 32], num_classes=20, classes=None, in_memory=True, max_memory_gb=None)
        cfg = OmegaConf.create({"dataset": ds, "data_dir": str(tmp_path)})
        load_data(cfg, torch.device("cpu"))
        assert list(cfg.dataset.classes) == [n.decode() for n in COARSE]


def test_svhn_reads_the_mat_files_channel_first_with_10_as_digit_0(tmp_path):
    written = write_svhn_like(tmp_path)
    reader = build_reader(dataset(reader={"_target_": "kdrun.data.readers.SVHN"}))
    root = reader.locate(tmp_path, "svhn", download=False)
    test = reader.read(root, "test")
    x, y = written["test"]
    assert test.images.shape == (20, 3, 32, 32) and test.images.dtype == torch.uint8
    for k, c, r, col in [(0, 0, 0, 1), (7, 1, 5, 30), (19, 2, 31, 0)]:
        assert test.images[k, c, r, col] == x[r, col, c, k]
    assert test.labels.tolist() == [int(v) % 10 for v in y[:, 0]]
    assert reader.fingerprint(root, "train").keys() == {"train_32x32.mat"}


def test_svhn_missing_files_name_the_places_looked_in(tmp_path):
    reader = build_reader(dataset(reader={"_target_": "kdrun.data.readers.SVHN"}))
    with pytest.raises(KdrunError) as e:
        reader.locate(tmp_path, "svhn", hint="dataset=mnist", download=False)
    assert str(e.value) == f"dataset svhn not found in {tmp_path}, torchvision download (failed or offline); try dataset=mnist"


@pytest.mark.slow
@pytest.mark.parametrize("name, write", [("cifar100", write_cifar100_like), ("svhn", write_svhn_like)])
def test_cli_trains_one_epoch_on_cifar100_and_svhn(kdrun, workdir, tmp_path, name, write):
    data_dir = tmp_path / "d"
    write(data_dir / "cifar-100-python" if name == "cifar100" else data_dir)
    kdrun("train", "teacher=mlp30", f"dataset={name}", f"data_dir={data_dir}", "epochs=1", "batch_size=32",
          "device=cpu", "progress=false")
    run = next((workdir / "runs" / "train").iterdir())
    res = json.loads((run / "results.json").read_text())
    assert (res["status"], res["dataset"], res["n_train"], res["n_test"]) == ("completed", name, 100, 20)


def write_png(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def write_tree(root, seed=0):
    """3 classes; train 4 images per class, test 2: RGB 8x8, grey 8x8 and RGB 12x10 (resized and cropped)."""
    rng = np.random.default_rng(seed)
    written = {}
    for split, n in (("train", 4), ("test", 2)):
        for c in ("cat", "dog", "emu"):
            for i in range(n):
                shape = [(8, 8, 3), (8, 8), (12, 10, 3)][i % 3]
                array = rng.integers(0, 256, shape, dtype=np.uint8)
                path = root / split / c / f"{i}.png"
                write_png(path, array)
                written[path] = array
    return written


def folder_config(root, tmp_path, **reader):
    node = {"_target_": "kdrun.data.readers.ImageFolder", "root": str(root), "size": 8, "channels": 3,
            "cache_dir": str(tmp_path / "cache"), "workers": 1, **reader}
    return dataset(reader=node, shape=[node["channels"], 8, 8], num_classes=3, classes=None,
                   in_memory="auto", max_memory_gb=None, workers=0)


def test_image_folder_decodes_converts_resizes_and_caches(tmp_path, caplog):
    root = tmp_path / "tree"
    written = write_tree(root)
    ds = folder_config(root, tmp_path)
    reader = build_reader(ds)
    assert reader.locate(tmp_path, "d") == root and reader.classes == ["cat", "dog", "emu"]
    train = reader.read(root, "train")
    assert train.images.shape == (12, 3, 8, 8) and train.images.dtype == torch.uint8
    assert train.labels.tolist() == [0] * 4 + [1] * 4 + [2] * 4  # sorted by class, then by file name
    rgb, grey = written[root / "train" / "dog" / "0.png"], written[root / "train" / "dog" / "1.png"]
    assert np.array_equal(train.images[4].numpy(), rgb.transpose(2, 0, 1))  # already 8x8: as written
    assert all(np.array_equal(train.images[5, c].numpy(), grey) for c in range(3))  # grey copied to R, G, B
    assert len(list((tmp_path / "cache").glob("*.pt"))) == 1  # the train split

    grey_ds = folder_config(root, tmp_path, channels=1)
    grey_reader = build_reader(grey_ds)
    grey_reader.locate(tmp_path, "d")
    as_grey = grey_reader.read(root, "train")
    assert as_grey.images.shape == (12, 1, 8, 8) and np.array_equal(as_grey.images[5, 0].numpy(), grey)

    again = build_reader(ds)  # a new run: the split comes from the cache
    again.locate(tmp_path, "d")
    with caplog.at_level("INFO", logger="kdrun"):
        cached = again.read(root, "train")
    assert "from the cache" in caplog.text and torch.equal(cached.images, train.images)
    assert again.fingerprint(root, "train") == reader.fingerprint(root, "train")


def test_a_changed_image_is_a_new_cache_key_and_a_new_transfer_identity(tmp_path):
    root = tmp_path / "tree"
    write_tree(root)
    ds = folder_config(root, tmp_path)
    reader = build_reader(ds)
    before = transfer_identity(ds, reader.locate(tmp_path, "d"), reader)
    write_png(root / "train" / "emu" / "3.png", np.zeros((8, 8, 3), np.uint8))
    reader = build_reader(ds)
    after = transfer_identity(ds, reader.locate(tmp_path, "d"), reader)
    assert before["files"] != after["files"] and len(list((tmp_path / "cache").glob("*.pt"))) == 2
    assert after["reader"] == {"_target_": "kdrun.data.readers.ImageFolder", "root": str(root), "size": 8,
                               "channels": 3}
    from kdrun.store import dataset_identity

    other = folder_config(tmp_path / "other_tree", tmp_path)
    assert dataset_identity(ds, before) != dataset_identity(ds, after)  # a changed image: another teacher
    assert dataset_identity(other, after) != dataset_identity(ds, after)  # another tree is another teacher
    assert dataset_identity(folder_config(root, tmp_path, workers=2), after) == dataset_identity(ds, after)


def _error(ds, tmp_path):
    reader = build_reader(ds)
    root = reader.locate(tmp_path, "d")
    reader.read(root, "train")
    reader.read(root, "test")


def test_image_folder_bad_inputs_are_one_line_each(tmp_path):
    root = tmp_path / "tree"
    cases = []
    with pytest.raises(KdrunError) as e:
        _error(folder_config(root, tmp_path), tmp_path)
    cases.append((str(e.value), f"ImageFolder: folder {root} not found"))

    write_tree(root)
    (root / "test" / "dog" / "0.png").unlink()
    (root / "test" / "dog" / "1.png").rename(root / "test" / "dog" / "notes.txt")
    with pytest.raises(KdrunError) as e:
        _error(folder_config(root, tmp_path), tmp_path)
    cases.append((str(e.value), f"ImageFolder: {root / 'test' / 'dog'} has no images (.bmp, .jpeg, .jpg, .pgm, "
                                ".png, .ppm, .tif, .tiff, .webp)"))

    (root / "test" / "dog" / "notes.txt").unlink()
    (root / "test" / "dog").rmdir()
    write_png(root / "test" / "fox" / "0.png", np.zeros((8, 8, 3), np.uint8))
    with pytest.raises(KdrunError) as e:
        _error(folder_config(root, tmp_path), tmp_path)
    cases.append((str(e.value), f"ImageFolder {root}: train and test hold different classes (only in train: dog; "
                                "only in test: fox)"))

    (root / "test" / "fox" / "0.png").rename(root / "test" / "emu" / "9.png")
    (root / "test" / "fox").rmdir()
    write_png(root / "test" / "dog" / "0.png", np.zeros((8, 8, 3), np.uint8))
    bad = root / "train" / "cat" / "2.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(KdrunError) as e:
        _error(folder_config(root, tmp_path), tmp_path)
    cases.append((str(e.value), f"ImageFolder: cannot read image {bad}: cannot identify image file '{bad}'"))

    write_png(bad, np.zeros((8, 8, 3), np.uint8))
    with pytest.raises(KdrunError) as e:
        _error(folder_config(root, tmp_path, size=None), tmp_path)
    cases.append((str(e.value), f"ImageFolder: {root / 'train' / 'dog' / '2.png'} is 12x10, the others 8x8; set "
                                "dataset.size to resize them all"))

    import shutil

    shutil.rmtree(root / "test")
    with pytest.raises(KdrunError) as e:
        _error(folder_config(root, tmp_path), tmp_path)
    cases.append((str(e.value), f"ImageFolder: {root / 'test'} is not a folder (expected {root}/train/<class>/ and "
                                f"{root}/test/<class>/)"))
    for got, expected in cases:
        assert got == expected


def test_unknown_reader_and_a_reader_that_is_not_one(tmp_path):
    with pytest.raises(KdrunError) as e:
        build_reader(dataset(reader={"_target_": "kdrun.data.readers.HDF5"}))
    assert str(e.value) == "dataset.reader: unknown reader 'kdrun.data.readers.HDF5' (not importable)"
    with pytest.raises(KdrunError) as e:
        build_reader(dataset(reader={"_target_": "builtins.dict"}))
    assert str(e.value) == ("dataset.reader builtins.dict is not a reader: it gave a dict, expected a "
                            "kdrun.data.readers.Reader or a callable (split) -> (images, labels)")
    with pytest.raises(KdrunError) as e:
        build_reader(dataset(format="hdf5"))
    assert str(e.value) == "dataset.format must be one of idx, cifar, got 'hdf5'"


def own_split(split, n=40):
    """A user's reader: (uint8 images [N, C, H, W], int64 labels [N]) for a split."""
    g = torch.Generator().manual_seed(0 if split == "train" else 1)
    return torch.randint(0, 256, (n, 1, 6, 6), generator=g, dtype=torch.uint8), torch.arange(n) % 4


def bad_split(split):
    return torch.zeros(3, 6, 6), torch.zeros(3, dtype=torch.int64)


def test_a_users_callable_is_a_reader(tmp_path):
    ds = dataset(reader={"_target_": "test_readers.own_split", "_partial_": True, "n": 40}, shape=[1, 6, 6],
                 num_classes=4, classes=None)
    cfg = OmegaConf.create({"dataset": ds, "data_dir": str(tmp_path)})
    data = load_data(cfg, torch.device("cpu"))
    assert len(data.train) == 40 and torch.equal(data.train.images, own_split("train")[0])
    assert len(data.transfer["files"]["decoded_sha256"]) == 16
    bad = dataset(reader={"_target_": "test_readers.bad_split", "_partial_": True})
    reader = build_reader(bad)
    with pytest.raises(KdrunError) as e:
        reader.read(reader.locate(tmp_path, "d"), "train")
    assert str(e.value) == ("dataset.reader (bad_split) train: images are torch.float32 [3, 6, 6], expected a uint8 "
                            "tensor [N, C, H, W]")


def test_a_torchvision_class_by_name(tmp_path):
    ds = dataset(reader={"_target_": "kdrun.data.readers.Torchvision", "name": "FakeData",
                         "options": {"size": 30, "image_size": [3, 5, 7], "num_classes": 3}})
    reader = build_reader(ds)
    root = reader.locate(tmp_path, "d")
    train = reader.read(root, "train")
    assert train.images.shape == (30, 3, 5, 7) and train.images.dtype == torch.uint8
    assert train.labels.dtype == torch.int64 and set(train.labels.tolist()) <= {0, 1, 2}
    with pytest.raises(KdrunError) as e:
        build_reader(dataset(reader={"_target_": "kdrun.data.readers.Torchvision", "name": "NoSuch"})).locate(
            tmp_path, "d")
    assert str(e.value) == "torchvision.datasets has no dataset 'NoSuch'"


@pytest.mark.slow
@pytest.mark.parametrize("args, expected", [
    (["dataset=imagefolder", "dataset.root={missing}", "dataset.num_classes=3"],
     "kdrun: error: ImageFolder: folder {missing} not found"),
    (["dataset=mnist", "dataset.reader._target_=nope.Reader"],
     "kdrun: error: dataset.reader: unknown reader 'nope.Reader' (not importable)"),
    (["dataset=mnist", "dataset.in_memory=maybe"], "kdrun: error: dataset.in_memory must be auto, true or false, got 'maybe'"),
])
def test_cli_refuses_a_bad_dataset_in_one_line_and_writes_nothing(kdrun, workdir, tmp_path, args, expected):
    missing = tmp_path / "no_such_tree"
    proc = kdrun("train", "device=cpu", *(a.format(missing=missing) for a in args), check=False)
    assert proc.returncode == 2 and proc.stderr.splitlines() == [expected.format(missing=missing)]
    assert not workdir.exists()


def test_a_tree_whose_classes_are_not_num_classes_is_refused_before_a_run(tmp_path):
    from kdrun.preflight import check_inputs

    root = tmp_path / "tree"
    write_tree(root)
    cfg = OmegaConf.create({"dataset": {**folder_config(root, tmp_path), "name": "pets", "num_classes": 4},
                            "data_dir": str(tmp_path), "device": "cpu"})
    with pytest.raises(KdrunError) as e:
        check_inputs(cfg)
    assert str(e.value) == "pets has 3 classes, but dataset.num_classes is 4; set dataset.num_classes=3"
    cfg.dataset.num_classes = 3
    data = load_data(cfg, torch.device("cpu"))
    assert list(cfg.dataset.classes) == ["cat", "dog", "emu"] and data.num_classes == 3
