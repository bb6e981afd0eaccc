import torch.nn.functional as F

from kdrun.objectives.base import Objective


class CrossEntropy(Objective):
    """Plain supervised training on labels (teachers, and students trained alone)."""

    def forward(self, model, batch, progress):
        logits = model(batch.x)
        loss = F.cross_entropy(logits, batch.y)
        return logits, loss, {"ce": loss.detach()}
