"""Schedules for T and alpha: a value as a function of training progress in [0, 1]."""

import math


class Constant:
    def __init__(self, value):
        self.value = float(value)

    def __call__(self, progress):
        return self.value

    def is_zero(self):
        return self.value == 0.0


class Anneal:
    """From `start` to `end` over training, linearly or along a half cosine."""

    def __init__(self, start, end, shape="linear"):
        if shape not in ("linear", "cosine"):
            raise ValueError(f"anneal shape must be linear or cosine, got {shape!r}")
        self.start, self.end, self.shape = float(start), float(end), shape

    def __call__(self, progress):
        p = min(max(progress, 0.0), 1.0)
        if self.shape == "cosine":
            p = 0.5 * (1 - math.cos(math.pi * p))
        return self.start + (self.end - self.start) * p

    def is_zero(self):
        return self.start == 0.0 and self.end == 0.0


class LrShape:
    """Learning-rate multiplier per optimiser step: linear warm-up, then cosine to zero or constant."""

    def __init__(self, total_steps, kind="cosine", warmup_steps=0):
        if kind not in ("cosine", "constant"):
            raise ValueError(f"lr schedule must be cosine or constant, got {kind!r}")
        self.total_steps, self.kind, self.warmup_steps = max(int(total_steps), 1), kind, int(warmup_steps)

    def __call__(self, step):
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.kind == "constant":
            return 1.0
        span = max(self.total_steps - self.warmup_steps, 1)
        return 0.5 * (1 + math.cos(math.pi * min(step - self.warmup_steps, span) / span))


def lr_schedule(optimizer, total_steps, kind="cosine", warmup_steps=0):
    import torch

    return torch.optim.lr_scheduler.LambdaLR(optimizer, LrShape(total_steps, kind, warmup_steps))
