"""Finding dataset files (data_dir, Debian's package, torchvision's download), their fingerprints, and the
MNIST-format IDX and CIFAR-10 layouts that a dataset config's `format` key names (see kdrun.data.readers)."""

import functools
import gzip
import hashlib
import logging
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from kdrun.data import cifar
from kdrun.data.idx import check_idx_pair, read_idx_pair
from kdrun.errors import KdrunError
from kdrun.io import atomic_write, sha256_file

log = logging.getLogger(__name__)


@dataclass
class Split:
    images: torch.Tensor  # uint8 [N, C, H, W]
    labels: torch.Tensor  # int64 [N]


@dataclass(frozen=True)
class Format:
    """How a dataset lies on disk: where under data_dir, which files make each split, how they are read."""

    folder: Callable  # (data_dir, cfg_dataset) -> the directory holding the files
    files: dict  # split -> its file names
    check: Callable  # (*paths) -> number of examples, after checking the files
    read: Callable  # (*paths) -> (images uint8 [N, C, H, W], labels int64 [N])


FORMATS = {
    "idx": Format(
        folder=lambda data_dir, ds: Path(data_dir) / ds.torchvision_class / "raw",  # torchvision's root/<Class>/raw/
        files={"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
               "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")},
        check=check_idx_pair,
        read=read_idx_pair,
    ),
    "cifar": Format(
        folder=lambda data_dir, ds: Path(data_dir) / cifar.FOLDER,
        files=cifar.FILES,
        check=cifar.check_batches,
        read=cifar.read_batches,
    ),
}


def get_format(name):
    """The Format called `name` (a dataset config's `format` key)."""
    if name not in FORMATS:
        raise KdrunError(f"dataset.format must be one of {', '.join(FORMATS)}, got {name!r}")
    return FORMATS[name]


def _have_files(directory, names, gz=False):
    suffix = ".gz" if gz else ""
    return all((Path(directory) / (name + suffix)).is_file() for name in names)


def _unpack_system_copy(system_dir, raw_dir, names):
    """Debian ships .gz files; the readers want them unpacked under data_dir."""
    for name in names:
        src = Path(system_dir) / (name + ".gz")
        try:
            with gzip.open(src, "rb") as fin:
                atomic_write(raw_dir / name, lambda f: shutil.copyfileobj(fin, f))
        except (OSError, EOFError) as e:
            raise KdrunError(f"cannot unpack {src} into {raw_dir}: {e}") from None


def find_files(raw, names, name, *, system_dir=None, fetch=None, hint=None, data_dir=None, download=True):
    """The directory `raw` once it holds every file of `names`: as it is, unpacked from a system copy of
    .gz files, or after `fetch()` (torchvision's download). A one-line error names every place looked in."""
    raw = Path(raw)
    if _have_files(raw, names):
        return raw
    if system_dir and _have_files(system_dir, names, gz=True):
        log.info("unpacking %s into %s", system_dir, raw)
        _unpack_system_copy(system_dir, raw, names)
        return raw
    if download and fetch is not None:
        tops = [p for p in (Path(data_dir) if data_dir else None, raw.parent, raw) if p is not None]
        existed = {p for p in tops if p.exists()}
        try:
            log.info("downloading %s into %s", name, data_dir or raw)
            fetch()
            if _have_files(raw, names):
                return raw
        except Exception as e:  # torchvision raises RuntimeError/URLError/OSError offline
            log.debug("download failed: %s", e)
        for p in reversed(tops):  # leave no empty folders behind a failed download
            if p not in existed and p.is_dir() and not any(p.iterdir()):
                p.rmdir()
    places = [str(raw)] + ([str(system_dir)] if system_dir else [])
    places += ["torchvision download (failed or offline)"] if fetch is not None else []
    tail = f"; try {hint}" if hint else ""
    raise KdrunError(f"dataset {name} not found in {', '.join(places)}{tail}")


def torchvision_fetch(class_name, data_dir, **kwargs):
    """A download of torchvision.datasets.<class_name> into data_dir (both splits where `train=` picks one)."""

    def fetch():
        import torchvision.datasets as tvd

        getattr(tvd, class_name)(root=str(data_dir), download=True, **(kwargs or {"train": True}))

    return fetch


def locate(cfg_dataset, data_dir, download=True):
    """Return the directory holding the dataset's files (in its `format`, default idx), fetching them if needed."""
    layout = get_format(cfg_dataset.get("format", "idx"))
    names = [name for names in layout.files.values() for name in names]
    return find_files(layout.folder(data_dir, cfg_dataset), names, cfg_dataset.name,
                      system_dir=cfg_dataset.get("system_dir"), hint=cfg_dataset.get("fallback_hint"),
                      fetch=torchvision_fetch(cfg_dataset.torchvision_class, data_dir), data_dir=data_dir,
                      download=download)


def _split_paths(raw_dir, split, fmt):
    return tuple(Path(raw_dir) / name for name in get_format(fmt).files[split])


@functools.lru_cache(maxsize=16)
def _file_sha256(path, size, mtime_ns):  # size and mtime make a changed file a new cache entry
    return sha256_file(path)


def files_fingerprint(paths):
    """Short hashes of files (by name), so that another copy of a dataset is told apart."""
    out = {}
    for path in map(Path, paths):
        st = path.stat()
        out[path.name] = _file_sha256(str(path), st.st_size, st.st_mtime_ns)[:16]
    return out


def split_fingerprint(raw_dir, split, fmt="idx"):
    """Short hashes of a split's files, so that another copy of a dataset is told apart."""
    return files_fingerprint(_split_paths(raw_dir, split, fmt))


def split_sha256(images, labels):
    """A short hash of a decoded split (its shape, pixels and labels)."""
    h = hashlib.sha256(str(list(images.shape)).encode())
    for chunk in images.reshape(len(images), -1).split(4096):
        h.update(chunk.contiguous().numpy().data)
    h.update(labels.contiguous().numpy().data)
    return h.hexdigest()[:16]


def check_split_files(raw_dir, split, fmt="idx"):
    """Check a split's files (IDX: the headers; cifar: the whole batches, cached); returns its number of examples."""
    return get_format(fmt).check(*_split_paths(raw_dir, split, fmt))


def load_split(raw_dir, split, fmt="idx"):
    """A split of the dataset in `raw_dir`, whose files are in format `fmt` (a key of FORMATS)."""
    images, labels = get_format(fmt).read(*_split_paths(raw_dir, split, fmt))
    return Split(images, labels)


def stratified_subset(labels, limit, seed):
    """Indices of `limit` examples with class proportions kept (deterministic for a seed)."""
    n = labels.numel()
    if limit is None or limit >= n:
        return torch.arange(n)
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(n, generator=g)
    classes = labels.unique()
    picked = []
    for c in classes.tolist():
        members = order[labels[order] == c]
        share = members.numel() * limit // n
        picked.append(members[:share])
    chosen = torch.cat(picked)
    shortfall = limit - chosen.numel()  # rounding leftovers, taken in shuffled order
    if shortfall > 0:
        mask = torch.ones(n, dtype=torch.bool)
        mask[chosen] = False
        chosen = torch.cat([chosen, order[mask[order]][:shortfall]])
    return chosen.sort().values
