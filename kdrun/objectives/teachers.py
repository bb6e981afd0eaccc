"""Where a distillation objective gets the teacher's logits for a batch."""

import torch


class CachedLogits:
    """Teacher logits computed once over the transfer set; a batch looks its rows up by index."""

    def __init__(self, logits):
        self.logits = logits

    def __call__(self, batch):
        return self.logits[batch.idx]


class OnlineTeacher:
    """The teacher run on the very batch the student sees (consistent augmented views)."""

    def __init__(self, model):
        self.model = model.eval()

    @torch.no_grad()
    def __call__(self, batch):
        return self.model(batch.x)
