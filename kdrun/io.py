"""Atomic, verifiable file writes: every artifact is written to a temp file and renamed."""

import hashlib
import io
import json
import os
import tempfile
import zipfile
from pathlib import Path

import torch

from kdrun.errors import KdrunError, StorageError, first_line


def atomic_write(path, write_fn, mode="wb"):
    """Call write_fn(file) on a temp file beside `path`, then rename it over `path`: a reader sees the
    old file or the new one, never half of one. A full disk, a read-only or forbidden folder is one
    StorageError naming the file, and leaves the old file as it was."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, mode) as f:
            write_fn(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise StorageError(f"cannot write {path}: {e.strerror or e}") from None
        raise


def write_json(path, obj):
    atomic_write(path, lambda f: f.write(json.dumps(obj, indent=2, sort_keys=True) + "\n"), mode="w")


def read_json(path):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise KdrunError(f"cannot read {path}: {e}") from None


CHECKSUM = "content_sha256"


def content_digest(obj):
    """sha256 of a payload's content: every tensor's dtype, shape and bytes, and every other value's
    repr, in key order. PyTorch does not check its archive's CRCs when loading; this catches a file
    whose numbers changed after kdrun wrote it."""
    h = hashlib.sha256()

    def walk(x):
        if isinstance(x, torch.Tensor):
            t = x.detach().cpu().contiguous().reshape(-1)
            h.update(f"{t.dtype}{list(x.shape)}".encode())
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        elif isinstance(x, dict):
            for k in sorted(x, key=str):
                if k != CHECKSUM:
                    h.update(repr(k).encode())
                    walk(x[k])
        elif isinstance(x, (list, tuple)):
            h.update(b"[")
            for v in x:
                walk(v)
            h.update(b"]")
        else:
            h.update(repr(x).encode())

    walk(obj)
    return h.hexdigest()


def save_torch(path, obj):
    """torch.save, atomically; a dict payload also records its content_digest."""
    if isinstance(obj, dict):
        obj = {**obj, CHECKSUM: content_digest(obj)}
    atomic_write(path, lambda f: torch.save(obj, f))


def load_torch(path, what="checkpoint"):
    """Load a kdrun artifact. weights_only=True: a checkpoint or cache can never run code."""
    return load_torch_and_hash(path, what)[0]


def load_torch_and_hash(path, what="checkpoint"):
    """(payload, sha256) of one read of the file, so the hash is of the very bytes that were loaded."""
    path = Path(path)
    if not path.is_file():
        raise KdrunError(f"{what} not found: {path}")
    data = path.read_bytes()
    if not zipfile.is_zipfile(io.BytesIO(data)):  # torch.save writes a zip archive; truncation breaks its index
        raise KdrunError(f"corrupt {what} {path}: not a PyTorch zip archive")
    try:
        payload = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for a damaged file
        raise KdrunError(f"corrupt {what} {path}: {first_line(e)}") from None
    if isinstance(payload, dict) and CHECKSUM in payload and payload[CHECKSUM] != content_digest(payload):
        raise KdrunError(f"corrupt {what} {path}: its content does not match its checksum")
    return payload, hashlib.sha256(data).hexdigest()


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def content_key(obj, length=12):
    """A short stable hash of a JSON-able object (used to find teachers and caches)."""
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:length]
