import torch
from torch import nn


class KDModel(nn.Module):
    """Every kdrun model: `features(x)` gives the penultimate features, `head` maps them to logits."""

    head: nn.Linear

    def features(self, x):
        raise NotImplementedError

    def forward(self, x):
        return self.head(self.features(x))

    @torch.no_grad()
    def constrain(self):
        """Apply weight constraints after an optimiser step (none by default)."""


class Dropout(nn.Dropout):
    """nn.Dropout with the same distribution, whose CPU masks come from torch.rand: CPU bernoulli_ took
    21% of an mlp1200 epoch here, and this mask is 3x faster forward and backward (bench/NOTES.md)."""

    def forward(self, x):
        if not self.training or self.p == 0 or x.device.type != "cpu":
            return super().forward(x)
        keep = torch.rand_like(x, dtype=torch.float32) >= self.p  # float32 even under bf16 autocast: exact p
        return x * keep.to(x.dtype).mul_(1 / (1 - self.p))
