import math

import torch
from torch import nn

from kdrun.models.base import Dropout, KDModel


class MLP(KDModel):
    """Fully connected ReLU net with input/hidden dropout and an optional max-norm constraint
    on each unit's incoming weight vector (Hinton et al. 2012)."""

    def __init__(self, in_shape, num_classes, hidden, dropout_input=0.0, dropout_hidden=0.0, max_norm=None):
        super().__init__()
        if not hidden or any(int(h) < 1 for h in hidden):
            raise ValueError(f"hidden sizes must be positive integers, got {list(hidden)}")
        layers = [nn.Flatten(), Dropout(dropout_input)]
        width = math.prod(in_shape)
        for h in hidden:
            layers += [nn.Linear(width, int(h)), nn.ReLU(), Dropout(dropout_hidden)]
            width = int(h)
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(width, num_classes)
        self.max_norm = max_norm

    def features(self, x):
        return self.body(x)

    @torch.no_grad()
    def constrain(self):
        if self.max_norm is None:
            return
        for m in self.modules():
            if isinstance(m, nn.Linear):  # torch.renorm's rule, in place: one pass fewer than renorm + copy_
                norms = torch.linalg.vector_norm(m.weight, dim=1, keepdim=True)
                m.weight.mul_(torch.where(norms > self.max_norm, self.max_norm / (norms + 1e-7), 1.0))
