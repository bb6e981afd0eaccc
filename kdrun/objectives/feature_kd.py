"""What the feature-based objectives (FitNets, attention transfer, RKD, PKT, CRD) share: the logit part
of their loss, the checks of the stage names they read, and the needs of those reading the
penultimate embeddings."""

import torch.nn.functional as F

from kdrun.losses import kd_kl
from kdrun.models.features import PENULTIMATE
from kdrun.objectives.base import Needs


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


def penultimate_needs(cfg=None):
    """The Needs of an objective that reads both models' penultimate embeddings (the heads' inputs):
    labels unless its config (`cfg`, None: the defaults) sets ce_weight to 0."""
    ce_weight = cfg.get("ce_weight", 1.0) if cfg is not None else 1.0
    return Needs(teacher=True, teacher_features=(PENULTIMATE,), student_features=(PENULTIMATE,),
                 labels=float(ce_weight) > 0)
