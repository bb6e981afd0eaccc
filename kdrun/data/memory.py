"""How a split is held: whole on the device when it fits (DeviceData), else streamed from host memory or
its memory-mapped cache file through a DataLoader (StreamData); and `mean: auto` / `std: auto`."""

import logging
import math
import os

import torch

from kdrun.data.batches import DeviceData, StreamData
from kdrun.errors import KdrunError

log = logging.getLogger("kdrun")

MEMORY_SHARE = 0.5  # of the host's available memory, when dataset.max_memory_gb is not set


def available_host_bytes():
    """The host's available memory (Linux: free pages; elsewhere: unknown, taken as unlimited)."""
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return math.inf


def budget_bytes(ds):
    limit = ds.get("max_memory_gb")
    return limit * 2**30 if limit is not None else MEMORY_SHARE * available_host_bytes()


def default_workers():
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(0, min(8, n - 1))


def _gb(n):
    return f"{n / 2**30:.3g} GiB" if n >= 2**30 else f"{n / 2**20:.3g} MiB"


def hold(name, split, images, labels, rows, mean, std, device, ds):
    """Rows `rows` of a split read as (images, labels), held as ds.in_memory asks (auto: on the device if
    it fits the memory budget, and the GPU's free memory for CUDA; streamed otherwise). Logs how."""
    per_image = images[0].numel() * images.element_size() if len(images) else 0
    nbytes = len(rows) * per_image
    in_memory = ds.get("in_memory", "auto")
    budget = budget_bytes(ds)
    fits = nbytes <= budget
    if fits and device.type == "cuda":
        fits = nbytes <= 0.8 * torch.cuda.mem_get_info(device)[0]
    if in_memory is True or (in_memory == "auto" and fits):
        data = DeviceData(images[rows], labels[rows], mean, std, device)
        log.info("%s %s: %d images %s, %s held on %s", name, split, len(rows), list(images.shape[1:]), _gb(nbytes),
                 device)
        return data
    workers = ds.get("workers", "auto")
    workers = default_workers() if workers in (None, "auto") else int(workers)
    source = "its memory-mapped cache file" if _is_mapped(images) else "host memory"
    data = StreamData(images, labels[rows], mean, std, device, source_rows=rows, workers=workers)
    why = "dataset.in_memory=false" if in_memory is False else f"over the memory budget of {_gb(budget)}"
    log.info("%s %s: %d images %s, %s streamed from %s (%s; %d DataLoader workers)", name, split, len(rows),
             list(images.shape[1:]), _gb(nbytes), source, why, workers)
    return data


def _is_mapped(images):
    try:
        return not images.untyped_storage().resizable()  # torch.load(mmap=True) storages cannot grow
    except Exception:
        return False


def channel_stats(images, rows, chunk=4096):
    """Per-channel mean and std (population) of pixels in [0, 1] over rows of uint8 images: exact, from
    each channel's histogram of the 256 values."""
    c = images.shape[1]
    counts = torch.zeros(c, 256, dtype=torch.float64)
    whole = len(rows) == len(images) and torch.equal(rows, torch.arange(len(images)))
    for part in rows.split(chunk):
        x = images[int(part[0]):int(part[-1]) + 1] if whole else images[part]  # a view, not a copy, if it can
        for k in range(c):  # bincount of uint8 is ~10x faster than summing squares in int32
            counts[k] += torch.bincount(x[:, k].reshape(-1), minlength=256).double()
    values = torch.arange(256, dtype=torch.float64) / 255
    n = counts.sum(1)
    mean = (counts * values).sum(1) / n
    std = ((counts * (values - mean[:, None]).pow(2)).sum(1) / n).sqrt()
    return [round(v, 6) for v in mean.tolist()], [round(v, 6) for v in std.tolist()]


def normalisation(ds, images, rows):
    """(mean, std) for the model's inputs: the config's, or computed over the train split's rows where
    it says auto (logged)."""
    mean, std = ds.mean, ds.std
    if mean == "auto" or std == "auto":
        auto_mean, auto_std = channel_stats(images, rows)
        mean = auto_mean if mean == "auto" else mean
        if std == "auto" and min(auto_std) == 0:
            raise KdrunError("dataset.std=auto: a channel of the train split is constant (std 0); set dataset.std")
        std = auto_std if std == "auto" else std
        log.info("%s: normalised by the train split's own statistics: mean=%s std=%s", ds.name, mean, std)
    return mean, std
