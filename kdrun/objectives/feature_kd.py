"""What the feature-based objectives (FitNets, attention transfer) share: the logit part of their loss
and the checks of the stage names they read."""

import torch.nn.functional as F

from kdrun.losses import kd_kl


def logit_terms(logits, teacher_logits, labels, T, ce_weight, kd_weight):
    """ce_weight * CE(labels, student) + kd_weight * T^2 * KL(teacher_T || student_T) (the KD term only
    when kd_weight > 0), and its parts for logging. The single-stage form of RepDistiller and mdistiller:
    CE, optionally Hinton KD, plus the method's own feature term."""
    loss, logs = 0.0, {}
    if ce_weight > 0:
        if labels is None:
            raise ValueError("ce_weight > 0 needs labels (set loss.ce_weight=0 for an unlabelled transfer set)")
        ce = F.cross_entropy(logits, labels)
        loss, logs["ce"] = ce_weight * ce, ce.detach()
    if kd_weight > 0:
        kd = T * T * kd_kl(logits, teacher_logits, T)
        loss, logs["kd_scaled"] = loss + kd_weight * kd, kd.detach()
    return loss, logs


def check_weights(**weights):
    for name, value in weights.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
            raise ValueError(f"{name} must be a number >= 0, got {value!r}")


def stage_names(what, names):
    """A list of stage names from the config (one name, or a list of them)."""
    if isinstance(names, str):
        names = [names]
    names = [str(n) for n in (names or [])]
    if not names:
        raise ValueError(f"{what} must name at least one stage")
    return tuple(names)
