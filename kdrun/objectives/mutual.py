import torch.nn.functional as F

from kdrun.losses import kd_kl
from kdrun.objectives.base import Objective


class MutualLearning(Objective):
    """Deep mutual learning (Zhang et al. 2018): K students trained together on the same batches; each
    minimises CE(labels, its own) + weight * T^2 * mean over the others j of KL(p_j || p_self) at T, the
    others' outputs held fixed. The sum over students is one backward pass: with the targets detached,
    each student's gradient is exactly that of its own loss (students updated simultaneously, not in turn).
    `model` is an Ensemble of the students; the returned logits are their combined prediction."""

    def __init__(self, temperature, weight=1.0):
        super().__init__()
        if weight < 0:
            raise ValueError(f"weight must be >= 0, got {weight}")
        self.temperature, self.weight = temperature, float(weight)

    def forward(self, model, batch, progress):
        T = self.temperature(progress)
        z = model.member_logits(batch.x)  # [B, K, C]
        k = z.shape[1]
        if k < 2:
            raise ValueError("mutual learning needs at least 2 students")
        loss, logs = 0.0, {"T": T}
        for i in range(k):
            ce = F.cross_entropy(z[:, i], batch.y)
            kl = sum(kd_kl(z[:, i], z[:, j].detach(), T) for j in range(k) if j != i) / (k - 1)
            loss = loss + ce + self.weight * T * T * kl
            logs[f"ce_{i}"], logs[f"kl_{i}"] = ce.detach(), kl.detach()
        return model.combined(z), loss, logs
