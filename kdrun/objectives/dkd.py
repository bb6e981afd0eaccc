"""Decoupled knowledge distillation (Zhao, Cui, Song, Qiu and Liang, "Decoupled Knowledge Distillation",
CVPR 2022). Hinton's KL at temperature T splits, per example with target class t, into

    TCKD = KL(b^T || b^S),  b = [p_t, 1 - p_t]                      (target vs the rest)
    NCKD = KL(p^T_\\t || p^S_\\t),  p_\\t the softmax over the non-target classes alone

and KD = TCKD + (1 - p^T_t) NCKD, p^T_t the teacher's target probability at T. DKD weights the two
terms freely: loss = ce_weight * CE + w(progress) * T^2 * (tckd_weight * TCKD + nckd_weight * NCKD).

Conventions of the official code (mdistiller), which produced the paper's numbers:
- both terms are multiplied by T^2 (the paper's formula has no T^2) and averaged over the batch;
- NCKD: mdistiller subtracts 1000 from the target's tempered logit before the softmax; here the
  target class is dropped exactly, which is the same up to exp(-1000) (zero in floating point);
- the warm-up factor w = min(epoch / warmup_epochs, 1) with epochs counted from 1, constant within
  an epoch (so the first epoch already has 1/warmup_epochs of the KD terms).
"""

import math

import torch
import torch.nn.functional as F
from kdrun.losses import zscore
from kdrun.objectives.base import Objective
from kdrun.objectives.checks import flag, weight


def dkd_terms(student_logits, teacher_logits, labels, T):
    """Per-example (TCKD, NCKD), each [B], unscaled (no T^2). With 2 classes the non-target set is one
    class, where both distributions are [1] and NCKD is exactly 0."""
    n_classes = student_logits.shape[-1]
    if n_classes < 2:
        raise ValueError(f"DKD needs at least 2 classes, got {n_classes}")
    target = F.one_hot(labels, n_classes).bool()
    s, t = student_logits / T, teacher_logits / T

    def binary_log_probs(z):  # log [p_t, 1 - p_t], without forming 1 - p_t (it may round to 0)
        log_norm = z.logsumexp(-1)
        log_target = z[target] - log_norm
        log_rest = z.masked_fill(target, -math.inf).logsumexp(-1) - log_norm
        return torch.stack([log_target, log_rest], dim=-1)

    def others(z):  # the non-target logits, [B, C - 1], in class order
        return z[~target].view(z.shape[0], n_classes - 1)

    tckd = F.kl_div(binary_log_probs(s), binary_log_probs(t), reduction="none", log_target=True).sum(-1)
    log_q, log_p = F.log_softmax(others(s), -1), F.log_softmax(others(t), -1)
    nckd = F.kl_div(log_q, log_p, reduction="none", log_target=True).sum(-1)
    return tckd, nckd


def dkd_loss(student_logits, teacher_logits, labels, T, tckd_weight=1.0, nckd_weight=8.0):
    """T^2 * batch mean of (tckd_weight * TCKD + nckd_weight * NCKD); either weight may be a per-example
    tensor [B]. Returns (loss, tckd, nckd), the last two T^2-scaled batch means, for logging."""
    tckd, nckd = dkd_terms(student_logits, teacher_logits, labels, T)
    loss = T * T * (tckd_weight * tckd + nckd_weight * nckd).mean()
    return loss, T * T * tckd.mean(), T * T * nckd.mean()


def warmup_factor(progress, warmup_epochs, epochs):
    """mdistiller's min(epoch / warmup_epochs, 1), epoch = 1, 2, ... the epoch that `progress` (the share
    of training steps done) falls in. warmup_epochs 0: no warm-up."""
    if warmup_epochs == 0:
        return 1.0
    epoch = math.floor(progress * epochs + 1e-9) + 1  # the tolerance: progress at an epoch's first step
    return min(epoch / warmup_epochs, 1.0)


class DKD(Objective):
    """ce_weight * CE(labels, student) + w * T^2 * (tckd_weight * TCKD + nckd_weight * NCKD), with the
    teacher's logits from `teacher` (the soft-target cache or an online teacher), T a schedule of
    progress, w the linear warm-up over the first `warmup_epochs` of `epochs`. standardize: z-score
    each example's logits, teacher's and student's, before the tempered softmax (Sun et al. 2024)."""

    uses_teacher = True  # its logits only: the soft-target cache serves it, and a fused T sweep works

    def __init__(self, temperature, teacher=None, tckd_weight=1.0, nckd_weight=8.0, ce_weight=1.0,
                 warmup_epochs=20, epochs=1, standardize=False):
        super().__init__()
        if teacher is None:
            raise ValueError("DKD needs a teacher (kdrun gives it one unless alpha=0)")
        self.temperature, self.teacher = temperature, teacher
        self.tckd_weight, self.nckd_weight = weight("tckd_weight", tckd_weight), weight("nckd_weight", nckd_weight)
        self.ce_weight, self.warmup_epochs = weight("ce_weight", ce_weight), weight("warmup_epochs", warmup_epochs)
        if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
            raise ValueError(f"epochs must be an integer >= 1, got {epochs!r}")
        self.epochs, self.standardize = epochs, flag("standardize", standardize)

    def forward(self, model, batch, progress):
        if batch.y is None:
            raise ValueError("DKD needs labels: its terms split the target class from the rest")
        T = self.temperature(progress)
        logits = model(batch.x)
        teacher_logits = self.teacher(batch, T)
        s, t = (zscore(logits), zscore(teacher_logits)) if self.standardize else (logits, teacher_logits)
        kd, tckd, nckd = dkd_loss(s, t, batch.y, T, self.tckd_weight, self.nckd_weight)
        w = warmup_factor(progress, self.warmup_epochs, self.epochs)
        ce = F.cross_entropy(logits, batch.y)
        loss = self.ce_weight * ce + w * kd
        return logits, loss, {"ce": ce.detach(), "tckd": tckd.detach(), "nckd": nckd.detach(), "warmup": w, "T": T}
