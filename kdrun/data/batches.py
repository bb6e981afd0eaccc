"""A whole split held as uint8 on the device; batches are sliced, jittered, flipped and normalised there."""

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class Batch:
    x: torch.Tensor  # float, normalised [B, C, H, W]
    y: torch.Tensor | None  # int64 [B]; None for an unlabeled transfer set
    idx: torch.Tensor  # positions in the whole split (keys into cached teacher logits)


def to_device(drawn, device):
    """A CPU draw (kdrun's randomness comes from CPU generators) moved to `device` without making the
    host wait: a copy from pageable memory to a GPU first waits for the GPU's queue, one from pinned
    memory does not."""
    if device.type == "cuda":
        return drawn.pin_memory().to(device, non_blocking=True)
    return drawn.to(device)


def _per_channel(value, device):
    """A dataset's mean or std, one number or one per channel, shaped to broadcast over [B, C, H, W]."""
    return torch.as_tensor(value, dtype=torch.float32, device=device).reshape(1, -1, 1, 1)


class DeviceData:
    def __init__(self, images, labels, mean, std, device, rows=None, labelled=True):
        self.images = images.to(device)
        self.labels = labels.to(device)
        self.device = torch.device(device)
        self.mean, self.std = _per_channel(mean, device), _per_channel(std, device)
        self.rows = None if rows is None else rows.to(device)  # positions in the whole split, if a subset
        self.labelled = labelled

    def subset(self, rows, labelled=True):
        """These rows (positions in this split) as their own DeviceData; batches keep whole-split indices."""
        rows = rows.to(self.device)
        origin = rows if self.rows is None else self.rows[rows]
        return DeviceData(self.images[rows], self.labels[rows], self.mean, self.std, self.device, origin, labelled)

    def __len__(self):
        return self.labels.numel()

    def normalize(self, x):
        """Pixels in [0, 1] -> the model's inputs."""
        return (x - self.mean) / self.std

    def to_unit(self, x):
        """The model's inputs -> pixels in [0, 1] (for distortions that fill with black or clip)."""
        return x * self.std + self.mean

    def batches(self, batch_size, shuffle=False, generator=None, jitter=0, flip=False):
        """Yield Batches; all randomness comes from a CPU generator so runs repeat across devices.
        jitter: shift each image by up to this many pixels (zero fill: a padded random crop); flip: mirror
        half the images left-right."""
        n = len(self)
        if shuffle:
            order = to_device(torch.randperm(n, generator=generator), self.device)
        else:
            order = torch.arange(n, device=self.device)
        for start in range(0, n, batch_size):
            idx = order[start : start + batch_size]
            x = self.images.index_select(0, idx)  # uint8 until normalised: the moves below touch a quarter of the bytes
            if jitter:
                x = random_shift(x, jitter, generator)
            if flip:
                x = random_flip(x, generator)
            x = x.float().sub_(255 * self.mean).div_(255 * self.std)
            labels = self.labels.index_select(0, idx) if self.labelled else None
            yield Batch(x, labels, idx if self.rows is None else self.rows.index_select(0, idx))

    def n_batches(self, batch_size):
        return -(-len(self) // batch_size)


def random_shift(x, max_shift, generator=None):
    """Shift each image by its own random (dy, dx) in [-k, k] pixels, filling with zeros."""
    b, c, h, w = x.shape
    k = int(max_shift)
    offsets = to_device(torch.randint(0, 2 * k + 1, (2, b), generator=generator), x.device)
    padded = F.pad(x, (k, k, k, k)).reshape(b, c, -1)
    sources = _shift_sources(h, w, k, x.device).index_select(0, offsets[0] * (2 * k + 1) + offsets[1])
    return padded.gather(2, sources[:, None, :].expand(b, c, h * w)).view(b, c, h, w)


@functools.cache
def _shift_sources(h, w, k, device):
    """For each shift (dy, dx) in [0, 2k]^2 (row dy * (2k + 1) + dx), where each output pixel of an
    image shifted by it is read in the padded, flattened image: one gather moves a whole batch (a 4-D
    advanced index took 3x longer)."""
    shifts = torch.arange(2 * k + 1, device=device)
    rows = shifts[:, None] + torch.arange(h, device=device)  # [2k+1, H] rows of the padded image
    cols = shifts[:, None] + torch.arange(w, device=device)
    flat = rows[:, None, :, None] * (w + 2 * k) + cols[None, :, None, :]  # [dy, dx, H, W]
    return flat.reshape((2 * k + 1) ** 2, h * w)


def random_flip(x, generator=None):
    """Mirror each image left-right with probability 1/2."""
    flipped = to_device(torch.rand(x.shape[0], generator=generator), x.device) < 0.5
    return torch.where(flipped[:, None, None, None], x.flip(-1), x)
