"""Inference with a generalist and specialists (Hinton et al. 2015, section 5.3).

Per example, q is the distribution over all C classes minimising
    KL(p_g || q) + sum over active specialists m of KL(p_m || q @ A_m),
A_m being specialist m's collapse matrix (each class onto its output, the others onto its dustbin).
"""

import torch

# Mixed into the starting q so that a class the generalist gave zero can still receive mass:
# the fixed point multiplies q_c, so a q_c of exactly zero would stay zero.
_START_MIX = 1e-12


def active_specialists(generalist_probs, specialties, top_n=1):
    """Bool [B, K]: specialist m is active if any of the generalist's top_n classes is one of its classes."""
    num_classes = generalist_probs.shape[1]
    if not 1 <= top_n <= num_classes:
        raise ValueError(f"top_n must be between 1 and the number of classes ({num_classes}), got {top_n}")
    covers = torch.zeros(num_classes, len(specialties), dtype=torch.bool, device=generalist_probs.device)
    for m, specialty in enumerate(specialties):
        covers[list(specialty.classes), m] = True
    top = generalist_probs.topk(top_n, dim=1).indices
    return covers[top].any(dim=1)


def _check_inputs(generalist_probs, specialist_probs, specialties, active):
    batch, num_classes = generalist_probs.shape
    if not len(specialist_probs) == len(specialties) == active.shape[1]:
        raise ValueError(
            f"got {len(specialist_probs)} specialist predictions, {len(specialties)} specialties "
            f"and {active.shape[1]} columns of active; they must agree"
        )
    if active.shape[0] != batch:
        raise ValueError(f"active has {active.shape[0]} rows, the generalist's predictions {batch}")
    for m, (probs, specialty) in enumerate(zip(specialist_probs, specialties)):
        if specialty.num_classes != num_classes:
            raise ValueError(f"specialty {m} is for {specialty.num_classes} classes, the generalist has {num_classes}")
        expected = (batch, specialty.n_outputs)
        if tuple(probs.shape) != expected:
            raise ValueError(f"specialist {m} predictions have shape {tuple(probs.shape)}, expected {expected}")


def _collapse_matrices(specialties, device):
    return [s.collapse_matrix(dtype=torch.float64, device=device) for s in specialties]


def _kl(p, q):
    """Per-row KL(p || q), with 0 log 0 = 0."""
    return (torch.xlogy(p, p) - torch.xlogy(p, q)).sum(dim=1)


def _shared_mass(q, specialist_probs, collapse):
    """r(q): the specialist's mass for each output, shared among that output's classes in proportion to q."""
    group_mass = (q @ collapse).clamp_min(torch.finfo(q.dtype).tiny)
    return q * ((specialist_probs / group_mass) @ collapse.T)


def combine(generalist_probs, specialist_probs, specialties, active, max_iter=500, tol=1e-7):
    """[B, C] distribution minimising the objective above, by the EM (minorise-maximise) fixed point
        q <- (p_g + sum over active m of r_m(q)) / (1 + number active),
    which never increases the objective, starting from q = p_g; stops when no entry moves by tol."""
    _check_inputs(generalist_probs, specialist_probs, specialties, active)
    p_g = generalist_probs.to(torch.float64)
    specialist_probs = [p.to(device=p_g.device, dtype=torch.float64) for p in specialist_probs]
    weights = active.to(device=p_g.device, dtype=torch.float64)
    collapse = _collapse_matrices(specialties, p_g.device)
    q = (1 - _START_MIX) * p_g + _START_MIX / p_g.shape[1]
    q = q / q.sum(dim=1, keepdim=True)
    for _ in range(max_iter):
        total = p_g.clone()
        for m, (probs, matrix) in enumerate(zip(specialist_probs, collapse)):
            total += weights[:, m : m + 1] * _shared_mass(q, probs, matrix)
        # Dividing by the row sum equals dividing by 1 + number active for normalised inputs, and
        # keeps q on the simplex despite rounding.
        new_q = total / total.sum(dim=1, keepdim=True)
        converged = not (new_q - q).abs().gt(tol).any()
        q = new_q
        if converged:
            break
    return q.to(generalist_probs.dtype)


def objective(q, generalist_probs, specialist_probs, specialties, active):
    """[B] float64: KL(p_g || q) + sum over active m of KL(p_m || q @ A_m)."""
    _check_inputs(generalist_probs, specialist_probs, specialties, active)
    q = q.to(torch.float64)
    value = _kl(generalist_probs.to(torch.float64), q)
    for m, (probs, matrix) in enumerate(zip(specialist_probs, _collapse_matrices(specialties, q.device))):
        term = _kl(probs.to(device=q.device, dtype=torch.float64), q @ matrix)
        # where() rather than a product: an inactive specialist's KL may be infinite.
        value = value + torch.where(active[:, m].to(q.device), term, torch.zeros_like(term))
    return value
