"""CIFAR-10 and CIFAR-100 files (torchvision's cifar-10-batches-py, cifar-100-python), read without letting a
file run code."""

import codecs
import functools
import pickle
from pathlib import Path

import numpy as np
import torch

from kdrun.errors import KdrunError

try:
    from numpy._core.multiarray import _reconstruct
except ImportError:  # numpy < 2
    from numpy.core.multiarray import _reconstruct

FOLDER = "cifar-10-batches-py"
FILES = {"train": tuple(f"data_batch_{i}" for i in range(1, 6)), "test": ("test_batch",)}
SHAPE = (3, 32, 32)
_ROW = 3 * 32 * 32


def _latin1_encode(text, encoding):
    """Python 3 pickles bytes at protocol 2 as codecs.encode(text, 'latin1'); no other codec is needed."""
    if encoding != "latin1":
        raise pickle.UnpicklingError(f"unexpected codec {encoding!r}")
    return codecs.encode(text, "latin1")


# Everything a pickled numpy array may name; a pickle can call whatever find_class hands it.
_ALLOWED = {
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): _latin1_encode,
}


class _Refused(Exception):
    pass


class _ArrayUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) not in _ALLOWED:
            raise _Refused(f"{module}.{name}")
        return _ALLOWED[(module, name)]


def read_pickle(path, what="CIFAR-10 batch file"):
    """A torchvision CIFAR pickle (a dict of numpy arrays and lists), loaded without letting it run code."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            return _ArrayUnpickler(f, encoding="bytes").load()
    except _Refused as e:
        raise KdrunError(f"{path} is not a {what} (it asks to load {e})") from None
    except OSError as e:
        raise KdrunError(f"cannot read {path}: {e.strerror or e}") from None
    except Exception as e:  # truncated or garbage: pickle raises EOFError, UnpicklingError, ValueError, ...
        raise KdrunError(f"{path} is not a {what}: {str(e) or type(e).__name__}") from None


def read_batch(path, label_key=b"labels", what="CIFAR-10 batch file"):
    """One batch file's images as uint8 [n, 3, 32, 32] and labels (under `label_key`) as int64 [n]."""
    path = Path(path)
    batch = read_pickle(path, what)
    if not isinstance(batch, dict) or b"data" not in batch or label_key not in batch:
        raise KdrunError(f"{path} is not a {what}: expected a dict with b'data' and {label_key!r}")
    data, labels = batch[b"data"], batch[label_key]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != _ROW:
        shown = f"{data.dtype} {list(data.shape)}" if isinstance(data, np.ndarray) else type(data).__name__
        raise KdrunError(f"{path}: data is {shown}, expected uint8 [n, {_ROW}]")
    if not isinstance(labels, list) or not all(type(v) is int for v in labels):
        raise KdrunError(f"{path}: labels must be a list of integers")
    if len(labels) != len(data):
        raise KdrunError(f"{path}: {len(labels)} labels for {len(data)} images")
    if labels and min(labels) < 0:
        raise KdrunError(f"{path}: labels must be >= 0, found {min(labels)}")
    images = torch.from_numpy(np.ascontiguousarray(data).reshape(-1, *SHAPE))  # rows are channel-major
    return images, torch.tensor(labels, dtype=torch.int64)


@functools.lru_cache(maxsize=16)
def _count_rows(path, size, mtime_ns, label_key=b"labels", what="CIFAR-10 batch file"):  # size, mtime: a changed
    return len(read_batch(path, label_key, what)[1])  # file is a new cache entry


def check_batches(*paths, label_key=b"labels", what="CIFAR-10 batch file"):
    """Read and check a split's batch files (cached while a file is unchanged); returns the number of images."""
    total = 0
    for path in paths:
        st = Path(path).stat()
        total += _count_rows(str(path), st.st_size, st.st_mtime_ns, label_key, what)
    return total


def read_batches(*paths, label_key=b"labels", what="CIFAR-10 batch file"):
    """A split's batch files joined: images uint8 [N, 3, 32, 32], labels int64 [N]."""
    parts = [read_batch(p, label_key, what) for p in paths]
    return torch.cat([images for images, _ in parts]), torch.cat([labels for _, labels in parts])


FOLDER_100 = "cifar-100-python"
FILES_100 = {"train": ("train",), "test": ("test",)}
WHAT_100 = "CIFAR-100 file"


def label_key_100(coarse):
    """CIFAR-100's files hold both labellings: the 100 fine classes and the 20 coarse superclasses."""
    return b"coarse_labels" if coarse else b"fine_labels"


def class_names(meta_path, key):
    """The class names a meta file lists under `key` (b'label_names', b'fine_label_names', ...), or None."""
    if not Path(meta_path).is_file():
        return None
    meta = read_pickle(meta_path, "CIFAR meta file")
    names = meta.get(key) if isinstance(meta, dict) else None
    if not isinstance(names, list) or not all(isinstance(n, bytes) for n in names):
        return None
    return [n.decode("utf-8", "replace") for n in names]
