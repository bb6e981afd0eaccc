"""Distillation losses as pure functions over logits (see shared kd-reference, section 1).

Convention: alpha weights the soft term,
    loss = alpha * T^2 * KL(p_T || q_T) + (1 - alpha) * CE(y, q_1),
KL summed over classes and averaged over the batch ("batchmean").
"""

import torch.nn.functional as F


def softmax_t(logits, T):
    """Softmax at temperature T: exp(z_i / T) / sum_j exp(z_j / T)."""
    return F.softmax(logits / T, dim=-1)


def kd_kl(student_logits, teacher_logits, T):
    """Unscaled KL(p_T || q_T), teacher p, student q, batchmean. Gradients scale as 1/T^2."""
    log_q = F.log_softmax(student_logits / T, dim=-1)
    log_p = F.log_softmax(teacher_logits / T, dim=-1)
    return F.kl_div(log_q, log_p, reduction="batchmean", log_target=True)


def hinton_loss(student_logits, teacher_logits, labels, T, alpha):
    """Hinton et al. 2015. Returns (total, parts); parts hold every term, unweighted, for logging.
    With no teacher (teacher_logits None) alpha must be 0: the student trained alone; with no labels
    (labels None, an unlabeled transfer set) alpha must be 1."""
    if labels is None:
        if alpha != 1 or teacher_logits is None:
            raise ValueError(f"alpha={alpha} needs labels")
        soft = kd_kl(student_logits, teacher_logits, T)
        return T * T * soft, {"kd_unscaled": soft.detach(), "kd_scaled": (T * T * soft).detach()}
    hard = F.cross_entropy(student_logits, labels)
    if teacher_logits is None:
        if alpha != 0:
            raise ValueError(f"alpha={alpha} needs teacher logits")
        return hard, {"ce": hard.detach()}
    soft = kd_kl(student_logits, teacher_logits, T)
    total = alpha * T * T * soft + (1 - alpha) * hard
    return total, {"ce": hard.detach(), "kd_unscaled": soft.detach(), "kd_scaled": (T * T * soft).detach()}


def logit_matching(student_logits, teacher_logits):
    """The high-T limit: 1/2 mean squared difference of per-example zero-meaned logits (per class)."""
    z = student_logits - student_logits.mean(dim=-1, keepdim=True)
    v = teacher_logits - teacher_logits.mean(dim=-1, keepdim=True)
    return 0.5 * (z - v).pow(2).sum(dim=-1).mean() / z.shape[-1]
