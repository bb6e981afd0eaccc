import math

import torch
from torch import nn

from kdrun.models.base import KDModel


class MLP(KDModel):
    """Fully connected ReLU net with input/hidden dropout and an optional max-norm constraint
    on each unit's incoming weight vector (Hinton et al. 2012)."""

    def __init__(self, in_shape, num_classes, hidden, dropout_input=0.0, dropout_hidden=0.0, max_norm=None):
        super().__init__()
        if not hidden or any(int(h) < 1 for h in hidden):
            raise ValueError(f"hidden sizes must be positive integers, got {list(hidden)}")
        layers = [nn.Flatten(), nn.Dropout(dropout_input)]
        width = math.prod(in_shape)
        for h in hidden:
            layers += [nn.Linear(width, int(h)), nn.ReLU(), nn.Dropout(dropout_hidden)]
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
            if isinstance(m, nn.Linear):
                m.weight.copy_(torch.renorm(m.weight, p=2, dim=0, maxnorm=self.max_norm))
