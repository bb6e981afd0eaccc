"""Similarity-preserving knowledge distillation (Tung and Mori, "Similarity-Preserving Knowledge
Distillation", ICCV 2019): the student's activations of a batch should make similar (dissimilar)
the examples the teacher's make similar (dissimilar). For a stage's activations A [b, ...] flattened
to Q [b, n]:

    G = row-normalised Q Q^T (each row divided by its L2 norm),  [b, b]
    L_SP = 1 / b^2 * || G_t - G_s ||_F^2   for each (student stage, teacher stage) pair
    loss = ce_weight * CE + gamma * sum over pairs of L_SP

gamma 3000 is the paper's (CIFAR-10) and RepDistiller/mdistiller's weight. The pair's sizes may differ
(only b x b matrices are compared). The authors' code and mdistiller use the last stage before the
pooling; kdrun's default pair is `s2`, the last convolutional stage of its CNN and LeNet-5 configs.
"""

import torch.nn.functional as F

from kdrun.objectives.base import Needs, Objective
from kdrun.objectives.feature_kd import check_weights, logit_terms, stage_names


def similarity_matrix(features):
    """G = row-normalised Q Q^T of the flattened activations Q, [b, b]."""
    q = features.flatten(1)
    return F.normalize(q @ q.t(), p=2, dim=1)


def sp_loss(student, teacher):
    """1 / b^2 * |G_t - G_s|_F^2 for one stage pair."""
    b = student.shape[0]
    return (similarity_matrix(teacher) - similarity_matrix(student)).pow(2).sum() / (b * b)


class SimilarityPreserving(Objective):
    """CE + gamma * sum over stage pairs of L_SP, optionally + Hinton KD (kd_weight, default 0).
    `student_stages` and `teacher_stages` are paired in order."""

    uses_teacher = True

    def __init__(self, temperature, teacher=None, student_stages=("s2",), teacher_stages=("s2",), gamma=3000.0,
                 ce_weight=1.0, kd_weight=0.0):
        super().__init__()
        if teacher is None:
            raise ValueError("SimilarityPreserving needs a teacher")
        check_weights(gamma=gamma, ce_weight=ce_weight, kd_weight=kd_weight)
        self.pairs = _pairs(student_stages, teacher_stages)
        self.student_features = tuple(dict.fromkeys(s for s, _ in self.pairs))
        self.teacher_features = tuple(dict.fromkeys(t for _, t in self.pairs))
        self.temperature, self.teacher = temperature, teacher
        self.gamma, self.ce_weight, self.kd_weight = float(gamma), float(ce_weight), float(kd_weight)

    @classmethod
    def needs(cls, cfg=None):
        get = cfg.get if cfg is not None else {}.get
        pairs = _pairs(get("student_stages", ["s2"]), get("teacher_stages", ["s2"]))
        return Needs(teacher=True, teacher_features=tuple(dict.fromkeys(t for _, t in pairs)),
                     student_features=tuple(dict.fromkeys(s for s, _ in pairs)), labels=float(get("ce_weight", 1.0)) > 0)

    def forward(self, model, batch, progress):
        T = self.temperature(progress)
        logits, feats = self.student_outputs(model, batch.x)
        teacher_logits, teacher_feats = self.teacher.outputs(batch)
        terms = [sp_loss(feats[s], teacher_feats[t].float()) for s, t in self.pairs]
        loss, logs = logit_terms(logits, teacher_logits, batch.y, T, self.ce_weight, self.kd_weight)
        logs.update({f"sp_{i}": term.detach() for i, term in enumerate(terms)})
        return logits, loss + self.gamma * sum(terms), {**logs, "T": T}


def _pairs(student_stages, teacher_stages):
    students, teachers = stage_names("student_stages", student_stages), stage_names("teacher_stages", teacher_stages)
    if len(students) != len(teachers):
        raise ValueError(f"student_stages {list(students)} and teacher_stages {list(teachers)} must pair up: give as "
                         "many of each")
    return list(zip(students, teachers))
