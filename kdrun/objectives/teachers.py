"""Where a distillation objective gets the teacher's logits for a batch."""

import torch


class CachedLogits:
    """Teacher logits computed once over the transfer set; a batch looks its rows up by index."""

    def __init__(self, logits):
        self.logits = logits

    def __call__(self, batch):
        return self.logits[batch.idx]


class OnlineTeacher:
    """The teacher run on the very batch the student sees (its jittered view): consistent targets
    (Beyer et al. 2022), at the price of a teacher forward pass per step."""

    def __init__(self, model):
        self.model = model.eval()

    def __call__(self, batch):
        with torch.no_grad():
            return self.model(batch.x)
