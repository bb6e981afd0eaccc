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


_LEVELS = 2**16  # one mask unit per 16 random bits: four units from each draw of the CPU generator


class Dropout(nn.Dropout):
    """nn.Dropout whose CPU masks cost a quarter of a draw per unit. The CPU generator spends the same
    time on a 64-bit draw as on one float32 (bernoulli_ took 21% of an mlp1200 epoch here, torch.rand
    masks 7%; bench/NOTES.md), so each draw is cut into four 16-bit units. A unit is dropped with
    probability p' = p rounded to a multiple of 2^-16 (and at most 1 - 2^-16), and kept ones are scaled by
    1 / (1 - p'), so the expectation is exactly the input's. GPUs keep F.dropout's one-pass kernel."""

    def forward(self, x):
        if not self.training or self.p == 0 or x.device.type != "cpu":
            return super().forward(x)
        dropped = min(round(self.p * _LEVELS), _LEVELS - 1)  # p' * 2^16
        draws = torch.empty(-(-x.numel() // 4), dtype=torch.int64).random_(-(2**63), 2**63 - 1)
        units = draws.view(torch.int16)[: x.numel()].view(x.shape)  # uniform over [-2^15, 2^15)
        keep = (units >= dropped - _LEVELS // 2).to(x.dtype).mul_(_LEVELS / (_LEVELS - dropped))
        return x * keep
