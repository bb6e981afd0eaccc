"""Relational knowledge distillation (Park, Kim, Lu and Cho, "Relational Knowledge Distillation",
CVPR 2019): the student's penultimate embeddings (the head's input) keep the teacher's relations
between the examples of a batch, not the embeddings themselves (their sizes may differ).

    distance: psi_D(i, j) = |e_i - e_j| / mu, mu the mean distance over the pairs i != j
    angle:    psi_A(i, j, k) = <(e_i - e_j) / |e_i - e_j|, (e_k - e_j) / |e_k - e_j|>
    loss = ce_weight * CE + distance_weight * huber(psi_D^s, psi_D^t) + angle_weight * huber(psi_A^s, psi_A^t)

huber is PyTorch's smooth L1 (delta 1) averaged over every entry (the B x B distance matrix with its
zero diagonal, the B x B x B angles), as in the authors' code and RepDistiller/mdistiller, whose
weights (25 and 50) this takes. Distances: Euclidean, their squares clamped at eps = 1e-12 before the
square root. Both relations are unchanged by a rotation, a reflection or a translation of either side's
embeddings, and by a positive scale of it (the distance through mu, the angle by its nature). A batch
of one example has no pairs: both terms are 0.
"""

import torch
import torch.nn.functional as F

from kdrun.models.features import PENULTIMATE
from kdrun.objectives.base import Objective
from kdrun.objectives.feature_kd import check_weights, logit_terms, penultimate_needs


def pairwise_distances(e, eps=1e-12):
    """[B, B] Euclidean distances, the diagonal exactly 0 (squares clamped at eps before the root)."""
    sq = e.pow(2).sum(1)
    d2 = (sq[:, None] + sq[None, :] - 2 * e @ e.t()).clamp(min=eps)
    return d2.sqrt() * (1 - torch.eye(len(e), dtype=e.dtype, device=e.device))


def distance_relation(e, eps=1e-12):
    """Pairwise distances over their mean off the diagonal."""
    d = pairwise_distances(e.flatten(1), eps)
    n = len(e)
    return d / (d.sum() / (n * (n - 1)))


def angle_relation(e):
    """[B, B, B]: entry (j, i, k) the cosine of the angle at e_j between e_i and e_k (0 when i or k is j)."""
    e = e.flatten(1)
    unit = F.normalize(e[None, :, :] - e[:, None, :], p=2, dim=2)  # [j, i]: (e_i - e_j) / |e_i - e_j|
    return unit @ unit.transpose(1, 2)


def rkd_distance_loss(student, teacher, eps=1e-12):
    if len(student) < 2:
        return student.sum() * 0
    with torch.no_grad():
        target = distance_relation(teacher, eps)
    return F.smooth_l1_loss(distance_relation(student, eps), target)


def rkd_angle_loss(student, teacher):
    if len(student) < 2:
        return student.sum() * 0
    with torch.no_grad():
        target = angle_relation(teacher)
    return F.smooth_l1_loss(angle_relation(student), target)


class RKD(Objective):
    """CE + distance_weight * RKD-D + angle_weight * RKD-A on the penultimate embeddings, optionally +
    Hinton KD (kd_weight, default 0: the authors' RKD alone with CE)."""

    uses_teacher = True
    teacher_features = student_features = (PENULTIMATE,)

    def __init__(self, temperature, teacher=None, distance_weight=25.0, angle_weight=50.0, ce_weight=1.0,
                 kd_weight=0.0):
        super().__init__()
        if teacher is None:
            raise ValueError("RKD needs a teacher")
        check_weights(distance_weight=distance_weight, angle_weight=angle_weight, ce_weight=ce_weight,
                      kd_weight=kd_weight)
        self.temperature, self.teacher = temperature, teacher
        self.distance_weight, self.angle_weight = float(distance_weight), float(angle_weight)
        self.ce_weight, self.kd_weight = float(ce_weight), float(kd_weight)

    @classmethod
    def needs(cls, cfg=None):
        return penultimate_needs(cfg)

    def forward(self, model, batch, progress):
        T = self.temperature(progress)
        logits, feats = self.student_outputs(model, batch.x)
        teacher_logits, teacher_feats = self.teacher.outputs(batch)
        s, t = feats[PENULTIMATE], teacher_feats[PENULTIMATE].float()
        distance, angle = rkd_distance_loss(s, t), rkd_angle_loss(s, t)
        loss, logs = logit_terms(logits, teacher_logits, batch.y, T, self.ce_weight, self.kd_weight)
        loss = loss + self.distance_weight * distance + self.angle_weight * angle
        return logits, loss, {**logs, "rkd_distance": distance.detach(), "rkd_angle": angle.detach(), "T": T}
