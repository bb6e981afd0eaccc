"""Which torch.device `device=auto|cpu|cuda|mps` means here (under torchrun: this rank's GPU)."""

import torch

from kdrun import distributed
from kdrun.errors import KdrunError


def resolve_device(name):
    """The torch.device that `device=name` means here; under torchrun, CUDA is this rank's GPU."""
    device = _pick_device(name)
    if distributed.world_size() == 1 or device.type == "cpu":
        return device
    if device.type == "mps":
        raise KdrunError("MPS does not run under torchrun (no process-group backend for it); use device=cpu")
    gpu, count = distributed.local_rank(), torch.cuda.device_count()
    if gpu >= count:
        raise KdrunError(f"torchrun's LOCAL_RANK is {gpu}, but this machine has {count} GPU(s); start at most "
                         f"{count} processes per node with device=cuda")
    return torch.device("cuda", gpu)


def _pick_device(name):
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise KdrunError("device=cuda but CUDA is not available here; use device=cpu or device=auto")
    if name == "mps" and not torch.backends.mps.is_available():
        raise KdrunError("device=mps but MPS is not available here; use device=cpu or device=auto")
    return torch.device(name)
