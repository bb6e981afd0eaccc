"""Attention transfer (Zagoruyko and Komodakis, "Paying More Attention to Attention: Improving the
Performance of Convolutional Neural Networks via Attention Transfer", ICLR 2017).

For a feature map A [B, C, H, W] the activation-based spatial attention map is
Q = mean over channels of |A|^p (p = 2), flattened to [B, H*W] and divided by its L2 norm per example.
For each pair j of (student stage, teacher stage):

    at_j = mean over the batch and the H*W positions of (Q_s / |Q_s| - Q_t / |Q_t|)^2

and the loss is

    loss = ce_weight * CE(labels, student) + kd_weight * T^2 * KL(teacher_T || student_T)
           + beta * sum over pairs of at_j

This is the convention of the authors' code, which produced the paper's numbers (its `at_loss`,
summed over groups and weighted by beta = 1000): the paper's formula, beta/2 * sum_j of the p-norm
of the difference, reads with beta "divided by the number of elements in the attention map and the
batch size", which the mean over batch and positions is; RepDistiller uses the same term and weight.
With kd_weight 0 (the default) this is the authors' AT without KD (their alpha = 0).
Spatial sizes of a pair must match for the difference: when they differ, the larger map is average-
pooled (adaptive) to the smaller's H x W before the attention maps are taken, as RepDistiller does.
"""

import torch.nn.functional as F

from kdrun.errors import KdrunError
from kdrun.objectives.base import Needs, Objective
from kdrun.objectives.feature_kd import check_weights, logit_terms, stage_names


def attention_map(features, p=2):
    """[B, H*W]: mean over channels of |A|^p, flattened, L2-normalised per example."""
    return F.normalize(features.abs().pow(p).mean(1).flatten(1), dim=1)


def match_sizes(student, teacher):
    """The pair with the larger map average-pooled to the smaller's spatial size."""
    hs, ws = student.shape[-2:]
    ht, wt = teacher.shape[-2:]
    if (hs, ws) == (ht, wt):
        return student, teacher
    if hs * ws > ht * wt:
        return F.adaptive_avg_pool2d(student, (ht, wt)), teacher
    return student, F.adaptive_avg_pool2d(teacher, (hs, ws))


def at_loss(student, teacher, p=2):
    """One pair's term: mean over batch and positions of the squared difference of attention maps."""
    student, teacher = match_sizes(student, teacher)
    return (attention_map(student, p) - attention_map(teacher, p)).pow(2).mean()


class AttentionTransfer(Objective):
    """CE + beta * sum over stage pairs of the attention-map distance, optionally + Hinton KD (see the
    module docstring). `student_stages` and `teacher_stages` are paired in order."""

    uses_teacher = True

    def __init__(self, temperature, teacher=None, student_stages=("s1", "s2"), teacher_stages=("s1", "s2"),
                 beta=1000.0, p=2, ce_weight=1.0, kd_weight=0.0):
        super().__init__()
        if teacher is None:
            raise ValueError("AttentionTransfer needs a teacher")
        check_weights(beta=beta, ce_weight=ce_weight, kd_weight=kd_weight)
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not p > 0:
            raise ValueError(f"p must be a number > 0, got {p!r}")
        student_stages, teacher_stages = stage_names("student_stages", student_stages), stage_names("teacher_stages",
                                                                                                   teacher_stages)
        if len(student_stages) != len(teacher_stages):
            raise ValueError(f"student_stages {list(student_stages)} and teacher_stages {list(teacher_stages)} "
                             "must pair up: give as many of each")
        self.temperature, self.teacher = temperature, teacher
        self.pairs = list(zip(student_stages, teacher_stages))
        self.student_features, self.teacher_features = tuple(dict.fromkeys(student_stages)), tuple(
            dict.fromkeys(teacher_stages))
        self.beta, self.p, self.ce_weight, self.kd_weight = float(beta), float(p), float(ce_weight), float(kd_weight)

    @classmethod
    def needs(cls, cfg=None):
        get = cfg.get if cfg is not None else {}.get
        students = stage_names("student_stages", get("student_stages", ["s1", "s2"]))
        teachers = stage_names("teacher_stages", get("teacher_stages", ["s1", "s2"]))
        return Needs(teacher=True, teacher_features=tuple(dict.fromkeys(teachers)),
                     student_features=tuple(dict.fromkeys(students)), labels=float(get("ce_weight", 1.0)) > 0)

    def attach(self, tap, example):
        super().attach(tap, example)
        s, t = self.student_shapes(example), self.teacher_shapes(example)
        for a, b in self.pairs:
            if len(s[a]) != 4 or len(t[b]) != 4:
                raise KdrunError(f"loss=at: attention maps need feature maps [C, H, W]; the student's stage '{a}' "
                                 f"gives {list(s[a][1:])}, the teacher's '{b}' {list(t[b][1:])}")

    def forward(self, model, batch, progress):
        T = self.temperature(progress)
        logits, feats = self.student_outputs(model, batch.x)
        teacher_logits, teacher_feats = self.teacher.outputs(batch)
        terms = [at_loss(feats[a], teacher_feats[b], self.p) for a, b in self.pairs]
        loss, logs = logit_terms(logits, teacher_logits, batch.y, T, self.ce_weight, self.kd_weight)
        logs.update({f"at_{i}": term.detach() for i, term in enumerate(terms)})
        return logits, loss + self.beta * sum(terms), {**logs, "T": T}
