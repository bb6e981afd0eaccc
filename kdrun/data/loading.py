"""A dataset config on disk -> the two splits on the device (`load_data`), and the identity of the
train split that the teacher store and the soft-target cache key on (`transfer_identity`: the files'
hashes, or the decoded pixels' hash). `source` is a kdrun.parts.DataPart: the dataset config, data_dir
and transfer.*."""

import json
from dataclasses import dataclass

from omegaconf import OmegaConf, open_dict

from kdrun.data.batches import DeviceData
from kdrun.data.memory import hold, normalisation
from kdrun.data.readers import build_reader, reader_config, reader_identity
from kdrun.data.sources import stratified_subset
from kdrun.data.transfer import describe, select_rows
from kdrun.errors import KdrunError


@dataclass
class Data:
    train: DeviceData  # or StreamData (kdrun.data.memory.hold decides): the same interface
    test: DeviceData
    shape: tuple
    num_classes: int
    transfer: dict  # identity of the transfer set (the train split as the teacher sees it)


_READ = {}  # (reader identity, root, split, fingerprint) -> (Split, class names): commands that load twice read once


def _read(reader, ds, root, split):
    key = (json.dumps(reader_identity(ds), sort_keys=True, default=str), str(root), split,
           json.dumps(reader.fingerprint(root, split), sort_keys=True))
    if key not in _READ:
        if len(_READ) >= 4:
            _READ.pop(next(iter(_READ)))
        _READ[key] = reader.read(root, split), reader.classes
    s, reader.classes = _READ[key]  # a reader learns its class names as it reads: this one did not read
    return s


_CHECKED = {}  # the reader check_data just used, for the load_data that follows it in the same command


def locate(source, keep=False, reuse=True):
    """(reader, root) of the dataset; `keep`: hold them for the next call of this command (an image tree
    is listed, one stat per file, once, not twice); `reuse=False` locates afresh."""
    key = json.dumps([OmegaConf.to_container(reader_config(source.dataset), resolve=True), str(source.data_dir)],
                     sort_keys=True, default=str)
    if reuse and key in _CHECKED:
        return _CHECKED[key] if keep else _CHECKED.pop(key)
    reader = build_reader(source.dataset)
    root = reader.locate(source.data_dir, source.dataset.name, source.dataset.get("fallback_hint"))
    if keep:
        _CHECKED.clear()
        _CHECKED[key] = reader, root
    return reader, root


def check_classes(ds, reader):
    if reader.classes is not None and len(reader.classes) != ds.num_classes:
        raise KdrunError(f"{ds.name} has {len(reader.classes)} classes, but dataset.num_classes is {ds.num_classes}; "
                         f"set dataset.num_classes={len(reader.classes)}")


def identify(source):
    """The transfer set's identity (see transfer_identity), without reading the splits into memory; the
    reader is kept for the load_data that follows."""
    reader, root = locate(source, keep=True)
    return transfer_identity(source.dataset, root, reader)


def check_data(source):
    """The dataset is there with sound files (IDX: the headers only; CIFAR: read once per process; an
    image tree: decoded, or found in its cache). Returns the identity of the transfer set."""
    reader, root = locate(source, keep=True, reuse=False)
    reader.count(root, "test")
    identity = transfer_identity(source.dataset, root, reader)
    check_classes(source.dataset, reader)
    return identity


def load_data(source, device):
    ds = source.dataset
    reader, root = locate(source)
    transfer = transfer_identity(ds, root, reader)
    splits, normalised = {}, None
    for split, limit in (("train", ds.limit), ("test", ds.test_limit)):
        s = _read(reader, ds, root, split)
        if list(s.images.shape[1:]) != list(ds.shape):
            raise KdrunError(f"{ds.name} {split} images have shape {list(s.images.shape[1:])}, expected {list(ds.shape)}")
        if len(s.labels) and int(s.labels.max()) >= ds.num_classes:
            raise KdrunError(f"{ds.name} {split} labels go up to {int(s.labels.max())}, expected < {ds.num_classes}")
        idx = stratified_subset(s.labels, limit, ds.subset_seed)
        if normalised is None:  # the train split's, for both splits
            normalised = normalisation(ds, s.images, idx)
        splits[split] = hold(ds.name, split, s.images, s.labels, idx, *normalised, device, ds)
    check_classes(ds, reader)
    if ds.get("classes") is None:  # the files' own names, else the class numbers
        with open_dict(ds):
            ds.classes = list(reader.classes or map(str, range(ds.num_classes)))
    assert transfer["n"] == len(splits["train"])
    return Data(splits["train"], splits["test"], tuple(ds.shape), int(ds.num_classes), transfer)


def transfer_identity(ds, raw_dir, reader=None):
    """What the teacher's soft targets are computed over: the train split (which copy of it, by the
    files' hashes, or the decoded pixels' hash), the subset, and the un-jittered transform."""
    reader = reader or build_reader(ds)
    n_train = reader.count(raw_dir, "train")
    identity = {"dataset": ds.name, "split": "train", "files": reader.fingerprint(raw_dir, "train"),
                "limit": ds.limit, "subset_seed": ds.subset_seed, "n": min(n_train, ds.limit or n_train),
                "transform": f"normalize(mean={ds.mean}, std={ds.std}), no jitter"}
    if ds.get("reader") is not None:
        identity["reader"] = reader_identity(ds)
    return identity


def labelled_rows(source, data):
    """The rows of the train split that transfer.* selects (fraction, classes, less the validation split),
    and what to record about them."""
    rows = select_rows(data.train.labels.cpu(), source.transfer, source.dataset.subset_seed)
    return data.train.subset(rows.train), {"transfer_set": describe(source.transfer), "n_val": int(rows.val.numel())}
