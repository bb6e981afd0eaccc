"""Probabilistic knowledge transfer (Passalis and Tefas, "Learning Deep Representations with
Probabilistic Knowledge Transfer", ECCV 2018): the student's penultimate embeddings should give each
example of a batch the same conditional distribution over the other examples as the teacher's. With
the embeddings L2-normalised per example (f / (|f| + eps), a zero vector left zero):

    K_ij = (1 + cos(f_i, f_j)) / 2                   the cosine kernel, in [0, 1]
    P_ij = K_ij / sum_k K_ik                          each row a distribution (j = i included)
    L_PKT = mean over i, j of P^t_ij log((P^t_ij + eps) / (P^s_ij + eps))
    loss = ce_weight * CE + pkt_weight * L_PKT

This follows the authors' code and RepDistiller/mdistiller, which differ from the paper's equation in
two ways kept here: the diagonal (an example's similarity to itself) is part of each row, and the
KL terms are averaged over all b^2 entries rather than summed (hence the large default weight, 30000,
RepDistiller's and mdistiller's). The two embeddings may have different widths: only b x b matrices
are compared, so PKT needs no regressor.
"""

import torch

from kdrun.models.features import PENULTIMATE
from kdrun.objectives.base import Objective
from kdrun.objectives.feature_kd import check_weights, logit_terms, penultimate_needs

EPS = 1e-7  # the authors'


def conditional_probabilities(features, eps=EPS):
    """P [b, b]: each row the cosine-kernel similarities of one example to the batch's, normalised."""
    f = features.flatten(1)
    f = f / (f.norm(dim=1, keepdim=True) + eps)
    kernel = (f @ f.t() + 1.0) / 2.0
    return kernel / kernel.sum(dim=1, keepdim=True)


def pkt_loss(student, teacher, eps=EPS):
    """The mean over the b x b entries of P_t log((P_t + eps) / (P_s + eps))."""
    p_s, p_t = conditional_probabilities(student, eps), conditional_probabilities(teacher, eps)
    return (p_t * torch.log((p_t + eps) / (p_s + eps))).mean()


class PKT(Objective):
    """CE + pkt_weight * L_PKT of the penultimate embeddings, optionally + Hinton KD (kd_weight)."""

    uses_teacher = True
    teacher_features = student_features = (PENULTIMATE,)

    def __init__(self, temperature, teacher=None, pkt_weight=30000.0, ce_weight=1.0, kd_weight=0.0):
        super().__init__()
        if teacher is None:
            raise ValueError("PKT needs a teacher")
        check_weights(pkt_weight=pkt_weight, ce_weight=ce_weight, kd_weight=kd_weight)
        self.temperature, self.teacher = temperature, teacher
        self.pkt_weight, self.ce_weight, self.kd_weight = float(pkt_weight), float(ce_weight), float(kd_weight)

    @classmethod
    def needs(cls, cfg=None):
        return penultimate_needs(cfg)

    def forward(self, model, batch, progress):
        T = self.temperature(progress)
        logits, feats = self.student_outputs(model, batch.x)
        teacher_logits, teacher_feats = self.teacher.outputs(batch)
        pkt = pkt_loss(feats[PENULTIMATE], teacher_feats[PENULTIMATE].float())
        loss, logs = logit_terms(logits, teacher_logits, batch.y, T, self.ce_weight, self.kd_weight)
        return logits, loss + self.pkt_weight * pkt, {**logs, "pkt": pkt.detach(), "T": T}
