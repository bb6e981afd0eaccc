import torch.nn.functional as F

from kdrun.losses import logit_matching
from kdrun.objectives.base import Objective, alpha_needs


class LogitMatching(Objective):
    """The high-temperature limit of Hinton KD: alpha * 1/(2N) |z - v|^2 (per-example zero-meaned
    logits, N classes, batch mean) + (1 - alpha) * CE(labels, student). T plays no part."""

    uses_teacher = True

    def __init__(self, alpha, teacher=None):
        super().__init__()
        if teacher is None and not alpha.is_zero():
            raise ValueError("LogitMatching needs a teacher unless alpha is 0")
        self.alpha, self.teacher = alpha, teacher

    @classmethod
    def needs(cls, cfg=None):
        return alpha_needs(cfg)

    def forward(self, model, batch, progress):
        alpha = self.alpha(progress)
        logits = model(batch.x)
        if batch.y is None:  # an unlabeled transfer set: validation has made sure alpha is 1
            matching = logit_matching(logits, self.teacher(batch))
            return logits, matching, {"logit_mse": matching.detach(), "alpha": alpha}
        hard = F.cross_entropy(logits, batch.y)
        if self.teacher is None:
            return logits, hard, {"ce": hard.detach(), "alpha": alpha}
        matching = logit_matching(logits, self.teacher(batch))
        loss = alpha * matching + (1 - alpha) * hard
        return logits, loss, {"ce": hard.detach(), "logit_mse": matching.detach(), "alpha": alpha}
