"""Distillation losses as pure functions over logits (Hinton, Vinyals & Dean, "Distilling the Knowledge
in a Neural Network", 2015; the convention, the T^2 scaling and the high-T limit: docs/loss.md).

Convention: alpha weights the soft term,
    loss = alpha * T^2 * KL(p_T || q_T) + (1 - alpha) * CE(y, q_1),
KL summed over classes and averaged over the batch ("batchmean").
"""

import torch
import torch.nn.functional as F


def softmax_t(logits, T):
    """Softmax at temperature T: exp(z_i / T) / sum_j exp(z_j / T)."""
    return F.softmax(logits / T, dim=-1)


def kd_kl(student_logits, teacher_logits, T):
    """Unscaled KL(p_T || q_T), teacher p, student q, batchmean. Gradients scale as 1/T^2."""
    log_q = F.log_softmax(student_logits / T, dim=-1)
    log_p = F.log_softmax(teacher_logits / T, dim=-1)
    return F.kl_div(log_q, log_p, reduction="batchmean", log_target=True)


def zscore(logits, eps=1e-7):
    """Logit standardisation (Sun et al. 2024): each example's logits less their mean, over their
    standard deviation (unbiased, plus eps, as in the official code)."""
    return (logits - logits.mean(-1, keepdim=True)) / (logits.std(-1, keepdim=True) + eps)


def hinton_loss(student_logits, teacher_logits, labels, T, alpha, standardize=False):
    """Hinton et al. 2015. Returns (total, parts); parts hold every term, unweighted, for logging.
    With no teacher (teacher_logits None) alpha must be 0: the student trained alone; with no labels
    (labels None, an unlabeled transfer set) alpha must be 1. standardize: the soft term compares the
    z-scored logits (see zscore); the hard term keeps the raw ones."""
    soft_student = zscore(student_logits) if standardize else student_logits
    if standardize and teacher_logits is not None:
        teacher_logits = zscore(teacher_logits)
    if labels is None:
        if alpha != 1 or teacher_logits is None:
            raise ValueError(f"alpha={alpha} needs labels")
        soft = kd_kl(soft_student, teacher_logits, T)
        return T * T * soft, {"kd_unscaled": soft.detach(), "kd_scaled": (T * T * soft).detach()}
    hard = F.cross_entropy(student_logits, labels)
    if teacher_logits is None:
        if alpha != 0:
            raise ValueError(f"alpha={alpha} needs teacher logits")
        return hard, {"ce": hard.detach()}
    soft = kd_kl(soft_student, teacher_logits, T)
    total = alpha * T * T * soft + (1 - alpha) * hard
    return total, {"ce": hard.detach(), "kd_unscaled": soft.detach(), "kd_scaled": (T * T * soft).detach()}


def logit_matching(student_logits, teacher_logits):
    """The high-T limit: 1/2 mean squared difference of per-example zero-meaned logits (per class)."""
    z = student_logits - student_logits.mean(dim=-1, keepdim=True)
    v = teacher_logits - teacher_logits.mean(dim=-1, keepdim=True)
    return 0.5 * (z - v).pow(2).sum(dim=-1).mean() / z.shape[-1]


def symmetric_kl(logits_a, logits_b, T, detach_targets=False):
    """KL(p_a || p_b) + KL(p_b || p_a) at T, batchmean. detach_targets: hold the target side of each
    direction fixed, so that a learns from b and b from a (the gradient of deep mutual learning),
    instead of the plain gradient of the symmetric KL."""
    if detach_targets:
        return kd_kl(logits_b, logits_a.detach(), T) + kd_kl(logits_a, logits_b.detach(), T)
    return kd_kl(logits_b, logits_a, T) + kd_kl(logits_a, logits_b, T)


def mmd(features_a, features_b, kernel="linear", bandwidth=None):
    """Squared maximum mean discrepancy between two batches of features (biased estimate: zero when the
    batches are identical). linear: |mean f_a - mean f_b|^2. gaussian: E k(a, a') + E k(b, b') - 2 E k(a, b),
    k = exp(-|x - y|^2 / (2 bandwidth^2)); bandwidth None: the median pairwise distance of both batches."""
    if kernel == "linear":
        return (features_a.mean(0) - features_b.mean(0)).pow(2).sum()
    if kernel != "gaussian":
        raise ValueError(f"mmd kernel must be linear or gaussian, got {kernel!r}")
    joint = torch.cat([features_a, features_b])
    d2 = torch.cdist(joint, joint).pow(2)
    if bandwidth is None:
        off_diagonal = d2[~torch.eye(len(joint), dtype=torch.bool, device=d2.device)]
        sigma2 = off_diagonal.detach().median().clamp_min(1e-12)  # the median distance, squared
    else:
        sigma2 = torch.tensor(float(bandwidth) ** 2, device=d2.device)
    k = torch.exp(-d2 / (2 * sigma2))
    n = len(features_a)
    return k[:n, :n].mean() + k[n:, n:].mean() - 2 * k[:n, n:].mean()
