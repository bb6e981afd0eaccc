"""IDX files (the MNIST format): header checks with exact messages, then torchvision's readers."""

import struct
from pathlib import Path

import torch
from torchvision.datasets.mnist import read_image_file, read_label_file

from kdrun.errors import KdrunError

_UBYTE = 0x08


def check_idx(path, ndim):
    """Validate magic, rank and length of an uncompressed IDX file of unsigned bytes; return its shape."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(4 + 4 * ndim)
    if len(head) < 4 or head[0] != 0 or head[1] != 0 or head[2] != _UBYTE or head[3] != ndim:
        raise KdrunError(
            f"corrupt IDX file {path}: bad magic {head[:4].hex() or 'empty'}, expected 0000080{ndim}"
        )
    if len(head) < 4 + 4 * ndim:
        raise KdrunError(f"corrupt IDX file {path}: header truncated")
    shape = struct.unpack(f">{ndim}I", head[4:])
    expected = 4 + 4 * ndim + int(torch.tensor(shape).prod())
    if size != expected:
        raise KdrunError(f"corrupt IDX file {path}: expected {expected} bytes for shape {list(shape)}, found {size}")
    return shape


def check_idx_pair(images_path, labels_path):
    """Check an images file and its labels file; returns the number of examples."""
    n_img = check_idx(images_path, 3)[0]
    n_lab = check_idx(labels_path, 1)[0]
    if n_img != n_lab:
        raise KdrunError(f"IDX files disagree: {images_path} has {n_img} images, {labels_path} has {n_lab} labels")
    return n_img


def read_idx_pair(images_path, labels_path):
    """Images as a uint8 [N, 1, H, W] tensor and labels as int64 [N], after checking both files."""
    check_idx_pair(images_path, labels_path)
    images = read_image_file(str(images_path)).unsqueeze(1).contiguous()
    labels = read_label_file(str(labels_path))
    return images, labels
