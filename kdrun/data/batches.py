"""A split held whole as uint8 on the device (DeviceData) or streamed through a DataLoader (StreamData);
batches are jittered, flipped and normalised on the device, with the same draws either way."""

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kdrun.errors import KdrunError


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


class _Split:
    """What both ways of holding a split share: labels on the device, normalisation, and how a drawn batch
    of uint8 images becomes a Batch. Every random draw comes from the CPU generator, in one order, so the
    same seed gives the same batches however the split is held."""

    def _setup(self, labels, mean, std, device, rows, labelled):
        self.device = torch.device(device)
        self.labels = labels.to(self.device)
        self.mean, self.std = _per_channel(mean, self.device), _per_channel(std, self.device)
        self.rows = None if rows is None else rows.to(self.device)  # positions in the whole split, if a subset
        self.labelled = labelled

    def __len__(self):
        return self.labels.numel()

    def normalize(self, x):
        """Pixels in [0, 1] -> the model's inputs."""
        return (x - self.mean) / self.std

    def to_unit(self, x):
        """The model's inputs -> pixels in [0, 1] (for distortions that fill with black or clip)."""
        return x * self.std + self.mean

    def n_batches(self, batch_size):
        return -(-len(self) // batch_size)

    def _batch(self, x, idx, generator, jitter, flip):
        """Augment uint8 images x (rows idx of this split, on the device) and normalise them."""
        if jitter:
            x = random_shift(x, jitter, generator)
        if flip:
            x = random_flip(x, generator)
        x = x.float().sub_(255 * self.mean).div_(255 * self.std)
        labels = self.labels.index_select(0, idx) if self.labelled else None
        return Batch(x, labels, idx if self.rows is None else self.rows.index_select(0, idx))


class DeviceData(_Split):
    """A split held whole on its device (the host's memory for the CPU)."""

    held = "device"

    def __init__(self, images, labels, mean, std, device, rows=None, labelled=True):
        self.images = images.to(device)
        self._setup(labels, mean, std, device, rows, labelled)

    def subset(self, rows, labelled=True):
        """These rows (positions in this split) as their own DeviceData; batches keep whole-split indices."""
        rows = rows.to(self.device)
        origin = rows if self.rows is None else self.rows[rows]
        return DeviceData(self.images[rows], self.labels[rows], self.mean, self.std, self.device, origin, labelled)

    def nbytes(self):
        return self.images.numel() * self.images.element_size()

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
            yield self._batch(x, idx, generator, jitter, flip)


class _Rows(torch.utils.data.Dataset):
    """The DataLoader's view of a split's source images: a batch of rows is one indexing of the source
    (a memory-mapped cache file or a host tensor), done in the worker processes."""

    def __init__(self, images):
        self.images = images

    def __len__(self):
        return len(self.images)

    def __getitems__(self, rows):
        return self.images[torch.as_tensor(rows)]


def _as_is(batch):
    return batch


class _Chunks(torch.utils.data.Sampler):
    """The batches of one pass, as lists of source rows; set before each pass (the DataLoader, whose
    workers persist, keeps this very sampler)."""

    def __init__(self):
        self.chunks = []

    def __iter__(self):
        return iter(self.chunks)

    def __len__(self):
        return len(self.chunks)


class StreamData(_Split):
    """A split streamed from its source (a memory-mapped cache file, or host memory) through a DataLoader
    (worker processes, pinned memory, persistent workers): only a few batches are in memory at a time.
    Batches are those DeviceData gives for the same generator: the order is drawn from the generator,
    the augmentation draws are made here, per batch, in the same order, after each batch arrives."""

    held = "streamed"

    def __init__(self, source, labels, mean, std, device, source_rows=None, rows=None, labelled=True, workers=0,
                 prefetch=4):
        self.source = source  # uint8 [M, C, H, W] on the host; this split is its rows `source_rows`
        self.source_rows = torch.arange(len(labels)) if source_rows is None else source_rows.cpu()
        self.workers, self.prefetch = int(workers), int(prefetch)
        self._setup(labels, mean, std, device, rows, labelled)
        self._loader, self._busy = None, False

    def subset(self, rows, labelled=True):
        """These rows (positions in this split) as their own StreamData; no pixels are copied."""
        rows_cpu = rows.cpu()
        origin = rows.to(self.device) if self.rows is None else self.rows[rows.to(self.device)]
        return StreamData(self.source, self.labels[rows.to(self.device)], self.mean, self.std, self.device,
                          self.source_rows[rows_cpu], origin, labelled, self.workers, self.prefetch)

    def nbytes(self):
        return len(self.source_rows) * self.source[0].numel() * self.source.element_size()

    @property
    def images(self):
        raise KdrunError("this command needs the whole split in memory, but it is streamed; set "
                         "dataset.in_memory=true (or a larger dataset.max_memory_gb)")

    def _make_loader(self, persistent):
        sampler = _Chunks()
        extra = {"persistent_workers": persistent, "prefetch_factor": self.prefetch} if self.workers else {}
        loader = torch.utils.data.DataLoader(_Rows(self.source), batch_sampler=sampler, collate_fn=_as_is,
                                             num_workers=self.workers, pin_memory=self.device.type == "cuda",
                                             **extra)
        return loader, sampler

    def batches(self, batch_size, shuffle=False, generator=None, jitter=0, flip=False):
        """Yield Batches, the same as DeviceData.batches for the same arguments and generator state."""
        n = len(self)
        order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
        chunks = [order[start : start + batch_size] for start in range(0, n, batch_size)]
        if self._busy:  # a pass inside a pass over this split: a loader of its own
            loader, sampler = self._make_loader(persistent=False)
        else:
            if self._loader is None:
                self._loader = self._make_loader(persistent=True)
            loader, sampler = self._loader
        sampler.chunks = [self.source_rows[c].tolist() for c in chunks]
        owner = loader is self._loader[0]
        self._busy = self._busy or owner
        try:
            for idx, x in zip(chunks, loader):
                idx = to_device(idx, self.device)
                x = x.to(self.device, non_blocking=True)
                yield self._batch(x, idx, generator, jitter, flip)
        finally:
            if owner:
                self._busy = False


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
