"""Image trees (root/<split>/<class>/<image>): listed, checked, decoded once by a process pool and cached as
one tensor file per split, keyed by every file's path, size and mtime (a changed file is a new key)."""

import hashlib
import logging
import multiprocessing
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from kdrun.data.sources import Split, split_sha256
from kdrun.errors import KdrunError, first_line
from kdrun.io import atomic_write, content_key

log = logging.getLogger("kdrun")

EXTENSIONS = (".bmp", ".jpeg", ".jpg", ".pgm", ".png", ".ppm", ".tif", ".tiff", ".webp")  # torchvision's
CACHE_FORMAT = 1
_CHUNK = 256  # images per task of the decoding pool


@dataclass
class Tree:
    root: Path
    classes: list  # class folder names, sorted: label i is classes[i]
    files: dict  # split -> list of (path as a str, label), sorted by class then file name
    digests: dict  # split -> sha256 of every file's path, label, size and mtime


@dataclass
class Loaded:
    split: Split
    sha256: str  # of the decoded pixels and labels

    @property
    def labels(self):
        return self.split.labels


def _list_split(root, split):
    top = root / split
    if not top.is_dir():
        raise KdrunError(f"ImageFolder: {top} is not a folder (expected {root}/train/<class>/ and "
                         f"{root}/test/<class>/)")
    classes = sorted(p.name for p in top.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise KdrunError(f"ImageFolder: {top} holds no class folders")
    files = {}
    for c in classes:
        with os.scandir(top / c) as entries:  # strings, not Paths, and one stat per file: 60,000 files in a second
            found = sorted((e.name, e.path, e.stat()) for e in entries
                           if os.path.splitext(e.name)[1].lower() in EXTENSIONS and not e.name.startswith(".")
                           and e.is_file())
        if not found:
            raise KdrunError(f"ImageFolder: {top / c} has no images ({', '.join(EXTENSIONS)})")
        files[c] = found
    return files


def scan(root):
    """The tree under root, checked: both splits there, each class folder with images, the same classes."""
    root = Path(root)
    if not root.is_dir():
        raise KdrunError(f"ImageFolder: folder {root} not found")
    listed = {split: _list_split(root, split) for split in ("train", "test")}
    train, test = set(listed["train"]), set(listed["test"])
    if train != test:
        only_train, only_test = ", ".join(sorted(train - test)) or "none", ", ".join(sorted(test - train)) or "none"
        raise KdrunError(f"ImageFolder {root}: train and test hold different classes (only in train: {only_train}; "
                         f"only in test: {only_test})")
    classes = sorted(train)
    files, digests = {}, {}
    for split in listed:
        files[split] = [(path, i) for i, c in enumerate(classes) for _, path, _ in listed[split][c]]
        h = hashlib.sha256()
        for i, c in enumerate(classes):
            for name, _, st in listed[split][c]:
                h.update(f"{split}/{c}/{name}\t{i}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
        digests[split] = h.hexdigest()
    return Tree(root, classes, files, digests)


def _target_size(size):
    if size is None:
        return None
    if isinstance(size, int):
        return (size, size)
    h, w = (int(v) for v in size)
    return (h, w)


def decode(path, size, channels, exact):
    """One image as uint8 [C, H, W]: converted to grey (1) or RGB (3); resized to cover `size` (H, W) and
    centre-cropped, or (exact) required to be that size already."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im = im.convert("L" if channels == 1 else "RGB")
            h, w = size
            if exact:
                if im.size != (w, h):
                    raise KdrunError(f"ImageFolder: {path} is {im.size[1]}x{im.size[0]}, the others {h}x{w}; set "
                                     "dataset.size to resize them all")
            elif im.size != (w, h):
                scale = max(h / im.size[1], w / im.size[0])
                new = (max(w, round(im.size[0] * scale)), max(h, round(im.size[1] * scale)))
                if new != im.size:
                    im = im.resize(new, Image.BILINEAR)
                left, top = (new[0] - w) // 2, (new[1] - h) // 2
                im = im.crop((left, top, left + w, top + h))
            array = np.asarray(im, dtype=np.uint8)
    except KdrunError:
        raise
    except Exception as e:  # PIL raises UnidentifiedImageError, OSError (truncated), ValueError, ...
        raise KdrunError(f"ImageFolder: cannot read image {path}: {first_line(e)}") from None
    return array[None] if array.ndim == 2 else array.transpose(2, 0, 1)


def _decode_chunk(paths, size, channels, exact):
    return np.stack([decode(p, size, channels, exact) for p in paths])


def default_workers():
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


def decode_all(paths, size, channels, workers=None):
    """uint8 [N, C, H, W] of the images at `paths`, decoded by a pool of `workers` processes."""
    target = _target_size(size)
    exact = target is None
    if exact:  # no size given: every image must have the first one's
        from PIL import Image

        try:
            with Image.open(paths[0]) as im:
                target = (im.size[1], im.size[0])
        except Exception as e:
            raise KdrunError(f"ImageFolder: cannot read image {paths[0]}: {first_line(e)}") from None
    workers = int(workers or default_workers())
    chunks = [paths[i:i + _CHUNK] for i in range(0, len(paths), _CHUNK)]
    if workers <= 1 or len(chunks) == 1:
        parts = [_decode_chunk(c, target, channels, exact) for c in chunks]
    else:
        context = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else None)
        with ProcessPoolExecutor(workers, mp_context=context) as pool:
            parts = list(pool.map(_decode_chunk, chunks, *([x] * len(chunks) for x in (target, channels, exact))))
    return torch.from_numpy(np.concatenate(parts))


def _say(message):
    """Log at INFO; before logging is set up (a command's preflight, which decodes a new tree), stderr."""
    if log.hasHandlers():
        log.info("%s", message)
    else:
        print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def load(tree, split, size, channels, cache_dir=None, workers=None):
    """A split of the tree: from cache_dir/<key>.pt when the files are unchanged (memory-mapped), else
    decoded and written there (atomically)."""
    items = tree.files[split]
    key = content_key({"format": CACHE_FORMAT, "reader": "ImageFolder", "split": split, "size": size,
                       "channels": channels, "classes": tree.classes,
                       "files": tree.digests[split]}, length=20)
    path = Path(cache_dir) / f"{key}.pt" if cache_dir else None
    started = time.perf_counter()
    if path is not None and path.is_file():
        try:
            payload = torch.load(path, mmap=True, weights_only=True)
            _say(f"{tree.root}/{split}: {len(payload['labels'])} images from the cache {path} "
                 f"({time.perf_counter() - started:.2f}s)")
            return Loaded(Split(payload["images"], payload["labels"]), payload["sha256"])
        except Exception as e:  # a damaged cache is decoded again, never trusted
            log.warning("%s: unreadable data cache (%s); decoding again", path, first_line(e))
    workers = int(workers or default_workers())
    _say(f"{tree.root}/{split}: decoding {len(items)} images with {workers} processes"
         + (f" (once: cached in {path.parent})" if path is not None else ""))
    images = decode_all([p for p, _ in items], size, channels, workers)
    labels = torch.tensor([label for _, label in items], dtype=torch.int64)
    sha = split_sha256(images, labels)
    _say(f"{tree.root}/{split}: decoded {len(labels)} images in {time.perf_counter() - started:.2f}s")
    if path is not None:
        payload = {"images": images, "labels": labels, "sha256": sha, "classes": tree.classes,
                   "root": str(tree.root), "split": split}
        atomic_write(path, lambda f: torch.save(payload, f))
        log.info("%s/%s: cached as %s", tree.root, split, path)
    return Loaded(Split(images, labels), sha)
