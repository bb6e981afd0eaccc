"""A specialist's view of the classes: its own classes plus one dustbin for all the others."""

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Specialty:
    """The classes a specialist separates; every other class of the num_classes goes to the dustbin."""

    classes: tuple[int, ...]
    num_classes: int

    def __post_init__(self):
        classes = tuple(sorted(int(c) for c in self.classes))
        if not classes:
            raise ValueError("a specialty needs at least one class")
        if len(set(classes)) != len(classes):
            raise ValueError(f"specialist classes must be unique, got {classes}")
        if classes[0] < 0 or classes[-1] >= self.num_classes:
            raise ValueError(f"specialist classes must lie in [0, {self.num_classes}), got {classes}")
        if len(classes) == self.num_classes:
            raise ValueError(f"a specialty covering all {self.num_classes} classes has no dustbin")
        object.__setattr__(self, "classes", classes)

    @property
    def dustbin(self):
        """Index of the dustbin output."""
        return len(self.classes)

    @property
    def n_outputs(self):
        """The specialist's outputs: its classes, then the dustbin."""
        return len(self.classes) + 1

    def _local_index(self, device=None):
        """[num_classes] table: full class -> specialist output."""
        table = torch.full((self.num_classes,), self.dustbin, dtype=torch.long, device=device)
        table[list(self.classes)] = torch.arange(len(self.classes), device=device)
        return table

    def to_local(self, labels):
        """Full-problem labels -> specialist outputs (the dustbin for a class not covered)."""
        return self._local_index(labels.device)[labels]

    def collapse_matrix(self, dtype=torch.float32, device=None):
        """[num_classes, n_outputs] 0/1 matrix A: q @ A collapses a full distribution q onto the outputs."""
        matrix = torch.zeros(self.num_classes, self.n_outputs, dtype=dtype, device=device)
        matrix[torch.arange(self.num_classes, device=device), self._local_index(device)] = 1
        return matrix

    def training_rows(self, labels, generator):
        """The specialist's training set: (rows, dustbin_shift).

        rows (sorted) holds every example of the specialist's classes and as many others drawn at
        random without replacement (all of them if fewer). dustbin_shift = log(n_others / n_drawn)
        is to be added to the dustbin logit after training, undoing the dustbin's under-sampling.
        """
        own = self.to_local(labels) != self.dustbin
        own_rows, other_rows = own.nonzero().flatten(), (~own).nonzero().flatten()
        if len(own_rows) == 0:
            raise ValueError(f"no example has a label in the specialist's classes {self.classes}")
        n_drawn = min(len(own_rows), len(other_rows))
        order = torch.randperm(len(other_rows), generator=generator, device=generator.device)
        drawn = other_rows[order[:n_drawn].to(other_rows.device)]
        rows = torch.cat([own_rows, drawn]).sort().values
        shift = math.log(len(other_rows) / n_drawn) if n_drawn else 0.0
        return rows, shift
