"""Data-parallel training under torchrun: `torchrun --nproc_per_node=N -m kdrun distill ...`.

Every process (rank) loads the whole data set and draws each global batch from the same seeded
generator, so data order and augmentation are those of one process; each rank trains on its own
contiguous slice of the batch (`shard`) through DistributedDataParallel (gloo on the CPU, nccl on
CUDA, one GPU per rank: cuda:LOCAL_RANK). `scaled` and `reduce_epoch` make the gradients and the
epoch's metrics those of the global batch. Only rank 0 writes: the CLI gives the other ranks a
private run dir, and store writes go through `rank0_first`.

Without torchrun (no WORLD_SIZE in the environment) there is one process and everything here is a
no-op. torch is imported only inside the functions that need it, so the CLI can ask `world_size()`
before loading torch.
"""

import contextlib
import os

from kdrun.errors import KdrunError

_state = {"nested": 0}


def world_size():
    """How many processes torchrun started (1 without torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank():
    return int(os.environ.get("RANK", "0"))


def local_rank():
    """This process's index on its machine: its GPU under device=cuda."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main():
    """Whether this process is the one that writes (rank 0; the only process without torchrun)."""
    return rank() == 0


def init(device):
    """Join the process group (once; nothing without torchrun): nccl for a CUDA device, else gloo.
    torchrun's MASTER_ADDR and MASTER_PORT say where the group meets."""
    import torch
    import torch.distributed as dist

    if world_size() == 1 or dist.is_initialized():
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")


def close():
    if world_size() > 1:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def barrier():
    import torch
    import torch.distributed as dist

    if dist.get_backend() == "nccl":
        dist.barrier(device_ids=[torch.cuda.current_device()])
    else:
        dist.barrier()


@contextlib.contextmanager
def rank0_first():
    """Rank 0 runs the body (caching a teacher's soft targets) while the others wait; then they run it,
    and find what rank 0 wrote. Nested blocks are part of the outermost one. Rank 0 releases the
    others even when its body fails (they then fail too, or torchrun stops them)."""
    if world_size() == 1 or _state["nested"]:
        yield
        return
    _state["nested"] += 1
    try:
        if not is_main():
            barrier()
            yield
        else:
            try:
                yield
            finally:
                barrier()
    finally:
        _state["nested"] -= 1


def check_batches(n, batch_size):
    """Refuse a split whose batches cannot give every rank at least one example."""
    world = world_size()
    smallest = min(batch_size, n % batch_size or batch_size)
    if world > 1 and smallest < world:
        raise KdrunError(f"a batch of {smallest} example(s) ({n} examples, batch_size={batch_size}) cannot be split "
                         f"over {world} processes; choose a batch_size that leaves no batch smaller than {world}")


def wrap(model):
    """The model as DistributedDataParallel for the training forward and backward under torchrun (the
    model itself otherwise). Train, save and constrain `model`: the wrapper shares its parameters."""
    if world_size() == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel

    device = next(model.parameters()).device
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def average_gradients(params):
    """Average the gradients of parameters outside the DDP-wrapped model (an objective's regressor)
    over the processes, as DDP does the model's; nothing without torchrun."""
    if world_size() == 1:
        return
    import torch.distributed as dist

    for p in params:
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad.div_(world_size())


def gather(tensor):
    """Every process's `tensor`, detached, concatenated along dim 0 in rank order (the rows may differ in
    number, as the shards of a batch do): of a shard's rows, the global batch's. `tensor` itself without
    torchrun."""
    if world_size() == 1:
        return tensor
    import torch
    import torch.distributed as dist

    sizes = [torch.zeros((), dtype=torch.long, device=tensor.device) for _ in range(world_size())]
    dist.all_gather(sizes, torch.tensor(tensor.shape[0], device=tensor.device))
    padded = tensor.detach().new_zeros((max(int(n) for n in sizes), *tensor.shape[1:]))
    padded[: tensor.shape[0]] = tensor.detach()
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded)
    return torch.cat([part[: int(n)] for part, n in zip(parts, sizes)])


def bounds(n, index, world):
    """[start, stop) of rank `index`'s contiguous slice of n examples: sizes differ by at most one."""
    base, extra = divmod(n, world)
    start = index * base + min(index, extra)
    return start, start + base + (index < extra)


def shard(batch, index=None, world=None):
    """Rank `index`'s (default: this rank's) contiguous slice of a global Batch (x, y, idx) when the
    batch is split over `world` processes (default: torchrun's); the batch itself in one process."""
    index, world = rank() if index is None else index, world_size() if world is None else world
    if world == 1:
        return batch
    start, stop = bounds(batch.x.shape[0], index, world)
    cut = slice(start, stop)
    return type(batch)(batch.x[cut], None if batch.y is None else batch.y[cut], batch.idx[cut])


def scaled(loss, n_local, n_global, world=None):
    """The loss to backpropagate so that DDP's average of the ranks' gradients is the gradient of the
    global batch's mean loss: each rank's mean over its n_local examples, times n_local * world / n_global
    (1 when the batch splits evenly; the last batch of an epoch may not)."""
    world = world_size() if world is None else world
    return loss if world == 1 else loss * (n_local * world / n_global)


def reduce_epoch(sums, correct):
    """Sum the ranks' per-example sums (a dict of tensors or numbers) and `correct` counts at the end of
    an epoch, so its metrics row is that of one process. Returns (sums, correct); in place of nothing
    without torchrun."""
    if world_size() == 1:
        return sums, correct
    import torch
    import torch.distributed as dist

    keys = list(sums)  # the same on every rank: the same objective logs the same terms
    values = torch.stack([torch.as_tensor(sums[k], dtype=torch.float64, device=correct.device) for k in keys])
    dist.all_reduce(values)
    dist.all_reduce(correct)
    return dict(zip(keys, values)), correct
