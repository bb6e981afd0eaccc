"""DIST (Huang, You, Wang, Qian and Xu, "Knowledge Distillation from A Stronger Teacher", NeurIPS 2022):
match relations, not values. With Y = softmax(Z / tau) for student and teacher ([B, C]),

    inter = 1 - mean over examples i of pearson(Y_s[i, :], Y_t[i, :])     (across classes)
    intra = 1 - mean over classes j of pearson(Y_s[:, j], Y_t[:, j])      (across the batch)
    loss  = ce_weight * CE + tau^2 * (inter_weight * inter + intra_weight * intra)

Conventions of the official code: the tau^2 factor (the paper's formula has none), and Pearson as the
cosine of the centred vectors with eps = 1e-8 added to the product of their norms.

Invariances that hold: Pearson is unchanged by a positive affine map a * Y + b of either side's
probabilities (exactly up to eps), so inter and intra are; through the softmax, only a shift of an
example's logits by a constant leaves Y, hence the loss, unchanged. Scaling the logits changes Y's
shape, so it changes the loss.
"""

import torch.nn.functional as F

from kdrun.objectives.base import Objective
from kdrun.objectives.checks import weight


def pearson(a, b, eps=1e-8):
    """Pearson correlation of each row of a with the same row of b ([N, D] -> [N])."""
    a, b = a - a.mean(-1, keepdim=True), b - b.mean(-1, keepdim=True)
    return (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1) + eps)


def inter_class_relation(y_s, y_t):
    """1 - mean over examples of the Pearson correlation of their class probabilities."""
    return 1 - pearson(y_s, y_t).mean()


def intra_class_relation(y_s, y_t):
    """1 - mean over classes of the Pearson correlation of their probabilities across the batch."""
    return 1 - pearson(y_s.t(), y_t.t()).mean()


def dist_loss(student_logits, teacher_logits, tau=1.0, inter_weight=1.0, intra_weight=1.0):
    """tau^2 * (inter_weight * inter + intra_weight * intra). Returns (loss, inter, intra), the last two
    unweighted and unscaled, for logging."""
    y_s, y_t = F.softmax(student_logits / tau, -1), F.softmax(teacher_logits / tau, -1)
    inter, intra = inter_class_relation(y_s, y_t), intra_class_relation(y_s, y_t)
    return tau * tau * (inter_weight * inter + intra_weight * intra), inter, intra


class DIST(Objective):
    """ce_weight * CE(labels, student) + tau^2 * (inter_weight * inter + intra_weight * intra), tau the
    temperature schedule, the teacher's logits from `teacher`. With no labels (an unlabelled transfer
    set) the CE term is left out."""

    uses_teacher = True  # its logits only: the soft-target cache serves it, and a fused T sweep works
    labels = False

    def __init__(self, temperature, teacher=None, inter_weight=1.0, intra_weight=1.0, ce_weight=1.0):
        super().__init__()
        if teacher is None:
            raise ValueError("DIST needs a teacher (kdrun gives it one unless alpha=0)")
        self.temperature, self.teacher = temperature, teacher
        self.inter_weight, self.intra_weight = weight("inter_weight", inter_weight), weight("intra_weight", intra_weight)
        self.ce_weight = weight("ce_weight", ce_weight)

    def forward(self, model, batch, progress):
        tau = self.temperature(progress)
        logits = model(batch.x)
        kd, inter, intra = dist_loss(logits, self.teacher(batch, tau), tau, self.inter_weight, self.intra_weight)
        logs = {"inter": inter.detach(), "intra": intra.detach(), "T": tau}
        if batch.y is None:
            return logits, kd, logs
        ce = F.cross_entropy(logits, batch.y)
        return logits, self.ce_weight * ce + kd, {"ce": ce.detach(), **logs}
