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
