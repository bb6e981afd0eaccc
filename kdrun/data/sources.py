"""Finding and loading MNIST-format datasets: Debian's package, data_dir, or torchvision's download."""

import functools
import gzip
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from kdrun.data.idx import check_idx_pair, read_idx_pair
from kdrun.errors import KdrunError
from kdrun.io import atomic_write, sha256_file

log = logging.getLogger(__name__)

_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


@dataclass
class Split:
    images: torch.Tensor  # uint8 [N, C, H, W]
    labels: torch.Tensor  # int64 [N]


def _raw_dir(data_dir, folder):
    return Path(data_dir) / folder / "raw"  # torchvision's layout: root/<Class>/raw/


def _have_files(directory, gz=False):
    suffix = ".gz" if gz else ""
    return all((Path(directory) / (name + suffix)).is_file() for pair in _FILES.values() for name in pair)


def _unpack_system_copy(system_dir, raw_dir):
    """Debian ships .gz files; torchvision's readers want them unpacked under data_dir."""
    for pair in _FILES.values():
        for name in pair:
            src = Path(system_dir) / (name + ".gz")
            try:
                with gzip.open(src, "rb") as fin:
                    atomic_write(raw_dir / name, lambda f: shutil.copyfileobj(fin, f))
            except (OSError, EOFError) as e:
                raise KdrunError(f"cannot unpack {src} into {raw_dir}: {e}") from None


def locate(cfg_dataset, data_dir, download=True):
    """Return the directory holding the four uncompressed IDX files, fetching them if needed."""
    raw = _raw_dir(data_dir, cfg_dataset.torchvision_class)
    if _have_files(raw):
        return raw
    system_dir = cfg_dataset.get("system_dir")
    if system_dir and _have_files(system_dir, gz=True):
        log.info("unpacking %s into %s", system_dir, raw)
        _unpack_system_copy(system_dir, raw)
        return raw
    if download:
        existed = {p for p in (Path(data_dir), raw.parent, raw) if p.exists()}
        try:
            import torchvision.datasets as tvd

            log.info("downloading %s into %s", cfg_dataset.name, data_dir)
            getattr(tvd, cfg_dataset.torchvision_class)(root=str(data_dir), train=True, download=True)
            if _have_files(raw):
                return raw
        except Exception as e:  # torchvision raises RuntimeError/URLError/OSError offline
            log.debug("download failed: %s", e)
        for p in (raw, raw.parent, Path(data_dir)):  # leave no empty folders behind a failed download
            if p not in existed and p.is_dir() and not any(p.iterdir()):
                p.rmdir()
    places = [str(raw)] + ([str(system_dir)] if system_dir else []) + ["torchvision download (failed or offline)"]
    hint = f"; try {cfg_dataset.fallback_hint}" if cfg_dataset.get("fallback_hint") else ""
    raise KdrunError(f"dataset {cfg_dataset.name} not found in {', '.join(places)}{hint}")


def _split_paths(raw_dir, split):
    return tuple(Path(raw_dir) / name for name in _FILES[split])


@functools.lru_cache(maxsize=8)
def _file_sha256(path, size, mtime_ns):  # size and mtime make a changed file a new cache entry
    return sha256_file(path)


def split_fingerprint(raw_dir, split):
    """Short hashes of a split's two files, so that another copy of a dataset is told apart."""
    out = {}
    for path in _split_paths(raw_dir, split):
        st = path.stat()
        out[path.name] = _file_sha256(str(path), st.st_size, st.st_mtime_ns)[:16]
    return out


def check_split_files(raw_dir, split):
    """Check a split's two IDX headers; returns its number of examples."""
    return check_idx_pair(*_split_paths(raw_dir, split))


def load_split(raw_dir, split):
    images, labels = read_idx_pair(*_split_paths(raw_dir, split))
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
