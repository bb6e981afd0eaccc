"""Dataset readers: a dataset config's `reader:` names one by `_target_` (any class here, or a user's
callable). A reader finds its files (`locate`), checks a split and counts it (`count`), fingerprints it
(`fingerprint`: what the soft-target cache keys on) and reads it (`read`: uint8 images [N, C, H, W] and
int64 labels [N])."""

import functools
from pathlib import Path

import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from kdrun.data import cifar
from kdrun.data.idx import check_idx_pair, read_idx_pair
from kdrun.data.sources import (FORMATS, Split, files_fingerprint, find_files, get_format, split_sha256,
                                torchvision_fetch)
from kdrun.errors import KdrunError, first_line

SPLITS = ("train", "test")
# Reader options that say how the data is fetched or how fast it is read, not what it is: left out of
# identities. An image tree's `root` stays in: two trees are two datasets to the teacher store.
RUN_LOCAL = ("cache_dir", "workers", "download", "system_dir")


class Reader:
    """A dataset on disk. Subclasses set `files` (split -> file names) and implement what differs."""

    files = {}
    classes = None  # the class names, where the files say

    def folder(self, data_dir):
        return Path(data_dir)

    def fetch(self, data_dir):
        """A download of the files into data_dir (None: there is none)."""
        return None

    def locate(self, data_dir, name, hint=None, download=True):
        names = [n for split in SPLITS for n in self.files[split]]
        return find_files(self.folder(data_dir), names, name, system_dir=getattr(self, "system_dir", None),
                          fetch=self.fetch(data_dir), hint=hint, data_dir=data_dir, download=download)

    def paths(self, root, split):
        return [Path(root) / n for n in self.files[split]]

    def count(self, root, split):
        return len(self.read(root, split).labels)

    def fingerprint(self, root, split):
        return files_fingerprint(self.paths(root, split))


class IDX(Reader):
    """MNIST-format IDX files in torchvision's layout, data_dir/<torchvision_class>/raw/ (MNIST, FashionMNIST,
    KMNIST, ...); unpacked from `system_dir` (.gz files, e.g. a Debian package) or downloaded if missing."""

    files = FORMATS["idx"].files

    def __init__(self, torchvision_class="MNIST", system_dir=None, download=True):
        self.torchvision_class, self.system_dir, self.download = torchvision_class, system_dir, download

    def folder(self, data_dir):
        return Path(data_dir) / self.torchvision_class / "raw"

    def fetch(self, data_dir):
        return torchvision_fetch(self.torchvision_class, data_dir) if self.download else None

    def count(self, root, split):
        return check_idx_pair(*self.paths(root, split))

    def read(self, root, split):
        return Split(*read_idx_pair(*self.paths(root, split)))


class CIFAR10(Reader):
    """torchvision's cifar-10-batches-py under data_dir (pickles read without letting them run code)."""

    files = cifar.FILES

    def __init__(self, download=True):
        self.download = download

    def folder(self, data_dir):
        return Path(data_dir) / cifar.FOLDER

    def fetch(self, data_dir):
        return torchvision_fetch("CIFAR10", data_dir) if self.download else None

    def count(self, root, split):
        return cifar.check_batches(*self.paths(root, split))

    def read(self, root, split):
        self.classes = cifar.class_names(Path(root) / "batches.meta", b"label_names")
        return Split(*cifar.read_batches(*self.paths(root, split)))


class CIFAR100(Reader):
    """torchvision's cifar-100-python under data_dir: the 100 fine classes, or the 20 superclasses with
    coarse=true (then set dataset.num_classes=20)."""

    files = cifar.FILES_100

    def __init__(self, coarse=False, download=True):
        self.coarse, self.download = bool(coarse), download
        self.key = cifar.label_key_100(self.coarse)

    def folder(self, data_dir):
        return Path(data_dir) / cifar.FOLDER_100

    def fetch(self, data_dir):
        return torchvision_fetch("CIFAR100", data_dir) if self.download else None

    def count(self, root, split):
        return cifar.check_batches(*self.paths(root, split), label_key=self.key, what=cifar.WHAT_100)

    def read(self, root, split):
        names_key = b"coarse_label_names" if self.coarse else b"fine_label_names"
        self.classes = cifar.class_names(Path(root) / "meta", names_key)
        return Split(*cifar.read_batches(*self.paths(root, split), label_key=self.key, what=cifar.WHAT_100))


class SVHN(Reader):
    """torchvision's SVHN files in data_dir: train_32x32.mat and test_32x32.mat (MATLAB, read with
    scipy.io.loadmat); label 10 is the digit 0, as torchvision has it."""

    files = {"train": ("train_32x32.mat",), "test": ("test_32x32.mat",)}
    classes = [str(d) for d in range(10)]

    def __init__(self, download=True):
        self.download = download

    def fetch(self, data_dir):
        if not self.download:
            return None
        train, test = (torchvision_fetch("SVHN", data_dir, split=s) for s in SPLITS)
        return lambda: (train(), test())

    def count(self, root, split):
        return _read_svhn(*_stat(self.paths(root, split)[0])).labels.numel()

    def read(self, root, split):
        return _read_svhn(*_stat(self.paths(root, split)[0]))


def _stat(path):
    st = Path(path).stat()
    return str(path), st.st_size, st.st_mtime_ns


@functools.lru_cache(maxsize=2)
def _read_svhn(path, size, mtime_ns):  # size and mtime: a changed file is a new entry
    import scipy.io

    try:
        mat = scipy.io.loadmat(path, variable_names=("X", "y"))
    except Exception as e:  # scipy raises ValueError, OSError, MatReadError, ... for a damaged file
        raise KdrunError(f"{path} is not an SVHN .mat file: {first_line(e)}") from None
    x, y = mat.get("X"), mat.get("y")
    if not isinstance(x, np.ndarray) or x.dtype != np.uint8 or x.ndim != 4 or x.shape[2] != 3:
        shown = f"{x.dtype} {list(x.shape)}" if isinstance(x, np.ndarray) else "missing"
        raise KdrunError(f"{path}: X is {shown}, expected uint8 [H, W, 3, N]")
    if not isinstance(y, np.ndarray) or y.size != x.shape[3]:
        raise KdrunError(f"{path}: {0 if y is None else y.size} labels for {x.shape[3]} images")
    labels = torch.from_numpy(y.reshape(-1).astype(np.int64))
    if labels.numel() and (labels.min() < 1 or labels.max() > 10):
        raise KdrunError(f"{path}: labels must be in 1..10, found {int(labels.min())}..{int(labels.max())}")
    images = torch.from_numpy(np.ascontiguousarray(x.transpose(3, 2, 0, 1)))  # [H, W, C, N] -> [N, C, H, W]
    return Split(images, labels % 10)


class ImageFolder(Reader):
    """Image files in root/train/<class>/ and root/test/<class>/ (PNG, JPEG, ... of any size, colour or
    grey): converted to `channels` (1 or 3), resized to cover `size` (an int for a square, or [H, W]; null
    keeps each image's own size, which must then agree) and centre-cropped to it. Decoded once, by
    `workers` processes, into cache_dir (keyed by every file's path, size and mtime)."""

    def __init__(self, root, size=None, channels=3, cache_dir=None, workers=None):
        from kdrun.data import image_folder

        self._impl = image_folder
        self.root, self.channels = Path(root), int(channels)
        self.size = size if size is None or isinstance(size, int) else [int(v) for v in size]  # [H, W]
        self.cache_dir, self.workers = cache_dir, workers
        self._loaded = {}

    def locate(self, data_dir, name, hint=None, download=True):
        root = self.root if self.root.is_absolute() else Path(data_dir) / self.root
        self.tree = self._impl.scan(root)
        self.classes = self.tree.classes
        return root

    def _load(self, root, split):
        if split not in self._loaded:
            self._loaded[split] = self._impl.load(self.tree, split, self.size, self.channels, self.cache_dir,
                                                  self.workers)
        return self._loaded[split]

    def count(self, root, split):
        return self._load(root, split).labels.numel()

    def fingerprint(self, root, split):
        return {"decoded_sha256": self._load(root, split).sha256}

    def read(self, root, split):
        return self._load(root, split).split


class Decoded(Reader):
    """A split that only exists once read (a torchvision dataset, a user's function): it is fingerprinted
    by the sha256 of its decoded pixels and labels."""

    def __init__(self):
        self._read = {}

    def locate(self, data_dir, name, hint=None, download=True):
        return Path(data_dir)

    def produce(self, root, split):
        raise NotImplementedError

    def read(self, root, split):
        if split not in self._read:
            images, labels = self.produce(root, split)
            self._read[split] = Split(*checked(images, labels, self.describe(split)))
        return self._read[split]

    def fingerprint(self, root, split):
        s = self.read(root, split)
        return {"decoded_sha256": split_sha256(s.images, s.labels)}


class Torchvision(Decoded):
    """Any torchvision.datasets class by `name` (e.g. KMNIST, STL10, Flowers102): built with root=data_dir
    (or `root`), train=True/False (or split="train"/"test" for a class that takes `split`), download and
    the other keys of `options`; PIL images or arrays are turned into uint8 [N, C, H, W]."""

    def __init__(self, name, root=None, download=True, options=None):
        super().__init__()
        self.name, self.root, self.download = name, root, download
        self.options = dict(options or {})

    def describe(self, split):
        return f"torchvision.datasets.{self.name} {split}"

    def locate(self, data_dir, name, hint=None, download=True):
        import torchvision.datasets as tvd

        if not hasattr(tvd, self.name):
            raise KdrunError(f"torchvision.datasets has no dataset {self.name!r}")
        return Path(self.root or data_dir)

    def produce(self, root, split):
        import inspect

        import torchvision.datasets as tvd

        cls = getattr(tvd, self.name)
        params = inspect.signature(cls).parameters
        given = {"root": str(root), "download": self.download, "train": split == "train", "split": split}
        given = {k: v for k, v in given.items() if k in params}  # FakeData takes none of them
        try:
            ds = cls(**given, **self.options)
        except Exception as e:
            raise KdrunError(f"torchvision.datasets.{self.name}({split}) failed: {first_line(e)}") from None
        self.classes = [str(c) for c in getattr(ds, "classes", [])] or None
        return _from_torchvision(ds)


def _from_torchvision(ds):
    """(uint8 [N, C, H, W], int64 [N]) of a torchvision dataset: its `data`/`targets` arrays when it keeps
    them (MNIST, CIFAR, SVHN's `labels`), else its items one by one."""
    data = getattr(ds, "data", None)
    targets = getattr(ds, "targets", getattr(ds, "labels", None))
    if data is not None and targets is not None and len(data) == len(targets):
        x = torch.as_tensor(np.asarray(data))
        if x.dtype == torch.uint8 and x.dim() in (3, 4):
            if x.dim() == 3:
                x = x[:, None]
            elif x.shape[-1] in (1, 3) and x.shape[1] not in (1, 3):
                x = x.permute(0, 3, 1, 2)  # [N, H, W, C] -> [N, C, H, W]
            return x.contiguous(), torch.as_tensor(np.asarray(targets), dtype=torch.int64)
    from torchvision.transforms.functional import pil_to_tensor

    images, labels = [], []
    for image, label in ds:
        images.append(pil_to_tensor(image) if not torch.is_tensor(image) else image)
        labels.append(int(label))
    return torch.stack(images), torch.tensor(labels, dtype=torch.int64)


class Function(Decoded):
    """A user's callable `fn(split)` ("train" or "test") -> (uint8 images [N, C, H, W], int64 labels [N])."""

    def __init__(self, fn, name=None):
        super().__init__()
        self.fn, self.name = fn, name or getattr(fn, "__name__", type(fn).__name__)

    def describe(self, split):
        return f"dataset.reader ({self.name}) {split}"

    def produce(self, root, split):
        return self.fn(split=split)


def checked(images, labels, what):
    """A reader's output as uint8 [N, C, H, W] and int64 [N] tensors, or one line saying what is wrong."""
    if not torch.is_tensor(images) or images.dtype != torch.uint8 or images.dim() != 4:
        shown = f"{images.dtype} {list(images.shape)}" if torch.is_tensor(images) else type(images).__name__
        raise KdrunError(f"{what}: images are {shown}, expected a uint8 tensor [N, C, H, W]")
    if not torch.is_tensor(labels) or labels.dtype != torch.int64 or labels.dim() != 1:
        shown = f"{labels.dtype} {list(labels.shape)}" if torch.is_tensor(labels) else type(labels).__name__
        raise KdrunError(f"{what}: labels are {shown}, expected an int64 tensor [N]")
    if len(labels) != len(images):
        raise KdrunError(f"{what}: {len(labels)} labels for {len(images)} images")
    if len(labels) and int(labels.min()) < 0:
        raise KdrunError(f"{what}: labels must be >= 0, found {int(labels.min())}")
    return images.contiguous(), labels


_FORMAT_READERS = {"idx": "kdrun.data.readers.IDX", "cifar": "kdrun.data.readers.CIFAR10"}


def reader_config(ds):
    """The dataset's reader config: `reader:`, or the one that an older `format:` key names."""
    if ds.get("reader") is not None:
        return ds.reader
    fmt = ds.get("format", "idx")
    get_format(fmt)  # an unknown format: one line naming the known ones
    node = {"_target_": _FORMAT_READERS[fmt]}
    if fmt == "idx":
        node.update(torchvision_class=ds.torchvision_class, system_dir=ds.get("system_dir"))
    return OmegaConf.create(node)


def build_reader(ds):
    """The Reader a dataset config names; a plain callable is wrapped as a Function reader."""
    node = reader_config(ds)
    target = node.get("_target_")
    if not target:
        raise KdrunError("dataset.reader needs a _target_ (e.g. kdrun.data.readers.ImageFolder)")
    try:
        reader = instantiate(node)
    except Exception as e:
        cause = e.__cause__ or e
        if isinstance(cause, KdrunError):
            raise cause from None
        if isinstance(cause, (ImportError, AttributeError)) or "Error locating target" in str(e):
            raise KdrunError(f"dataset.reader: unknown reader {target!r} (not importable)") from None
        raise KdrunError(f"dataset.reader {target}: {first_line(cause)}") from None
    if isinstance(reader, Reader):
        return reader
    if callable(reader):
        return Function(reader, target.rsplit(".", 1)[-1])
    raise KdrunError(f"dataset.reader {target} is not a reader: it gave a {type(reader).__name__}, expected a "
                     "kdrun.data.readers.Reader or a callable (split) -> (images, labels)")


def reader_identity(ds):
    """What of the reader's config changes the data (CIFAR-100's coarse, an image size), for keys."""
    node = OmegaConf.to_container(reader_config(ds), resolve=True)
    return {k: v for k, v in node.items() if k not in RUN_LOCAL}
