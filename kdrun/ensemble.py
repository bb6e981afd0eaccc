"""An ensemble of teachers (paper section 5) as one teacher: how members' logits combine at T."""

import math

import torch
import torch.nn.functional as F
from torch import nn

from kdrun.models import capabilities

COMBINES = ("arithmetic", "geometric")


def combine_logits(member_logits, combine, T=None):
    """Logits [..., C] whose softmax at T is the ensemble's distribution at T, from members' [..., M, C].

    arithmetic: the mean of the members' probabilities at T, as logits: T * log(mean_m softmax(z_m / T)).
    geometric: the mean logits, whose softmax at any T is the members' normalised geometric mean.
    T=None asks for the high-temperature limit (logit matching), where both are the mean logits: the
    arithmetic mean of softmax(z_m / T) is 1/C + mean_m(z_m - mean z_m) / (C T) + O(1/T^2)."""
    if combine not in COMBINES:
        raise ValueError(f"combine must be one of {', '.join(COMBINES)}, got {combine!r}")
    if combine == "geometric" or T is None:
        return member_logits.mean(dim=-2)
    log_p = F.log_softmax(member_logits / T, dim=-1)
    return T * (torch.logsumexp(log_p, dim=-2) - math.log(member_logits.shape[-2]))


class Ensemble(nn.Module):
    """Models run side by side (teachers, or students that learn together). `forward` gives the combined
    logits at T=1 (for evaluation and argmax); `member_logits` gives every member's, [B, M, C], for soft
    targets at any T."""

    def __init__(self, members, combine):
        super().__init__()
        combine_logits(torch.zeros(1, 1, 1), combine)  # refuse an unknown combine now
        self.members = nn.ModuleList(members)
        self.combine = combine

    def member_logits(self, x):
        return torch.stack([m(x) for m in self.members], dim=-2)

    def combined(self, member_logits):
        return combine_logits(member_logits, self.combine, 1.0)

    def forward(self, x):
        return self.combined(self.member_logits(x))

    @torch.no_grad()
    def constrain(self):
        for m in self.members:
            capabilities.constrain(m)
