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
    """Learning-rate multiplier per optimiser step: linear warm-up, then cosine to zero, constant, or
    `step`: multiplied by `gamma` at each of `milestones`, given as fractions of training (the CIFAR
    recipe's epochs 150, 180, 210 of 240 are 0.625, 0.75, 0.875), so a shorter run keeps the shape."""

    KINDS = ("cosine", "constant", "step")

    def __init__(self, total_steps, kind="cosine", warmup_steps=0, milestones=(), gamma=0.1):
        if kind not in self.KINDS:
            raise ValueError(f"lr schedule must be one of {', '.join(self.KINDS)}, got {kind!r}")
        milestones = [float(m) for m in milestones]
        if any(not 0 < m < 1 for m in milestones) or milestones != sorted(milestones):
            raise ValueError(f"lr milestones must be increasing fractions of training in (0, 1), got {milestones}")
        if kind == "step" and not milestones:
            raise ValueError("lr schedule step needs milestones (fractions of training, e.g. [0.5, 0.75])")
        self.total_steps, self.kind, self.warmup_steps = max(int(total_steps), 1), kind, int(warmup_steps)
        self.boundaries = [round(m * self.total_steps) for m in milestones]
        self.gamma = float(gamma)

    def __call__(self, step):
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.kind == "constant":
            return 1.0
        if self.kind == "step":
            return self.gamma ** sum(step >= b for b in self.boundaries)
        span = max(self.total_steps - self.warmup_steps, 1)
        return 0.5 * (1 + math.cos(math.pi * min(step - self.warmup_steps, span) / span))


def lr_schedule(optimizer, total_steps, kind="cosine", warmup_steps=0, milestones=(), gamma=0.1):
    import torch

    return torch.optim.lr_scheduler.LambdaLR(optimizer, LrShape(total_steps, kind, warmup_steps, milestones, gamma))
