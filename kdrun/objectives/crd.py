"""Contrastive representation distillation (Tian, Krishnan and Isola, "Contrastive Representation
Distillation", ICLR 2020), with the conventions of the authors' code (RepDistiller, crd/).

The student's and the teacher's penultimate features (the heads' inputs) are embedded by a linear
layer each and L2-normalised (`feat_dim`, 128). Two memory banks hold an embedding of every row of the
train split, the student's (S) and the teacher's (M). For an example i of the batch, with K negative
rows j_1..j_K drawn uniformly from the split's rows other than i ("exact" mode: the positive is the
example's own row):

    student anchor: P_s(k) = exp(<M[k], s_i> / tau) / Z_s,   k in (i, j_1, ..., j_K)
    teacher anchor: P_t(k) = exp(<S[k], t_i> / tau) / Z_t
    NCE(P) = -1/B sum_i [ log(P(i) / (P(i) + K/N + eps)) + sum_k log((K/N) / (P(j_k) + K/N + eps)) ]
    loss = ce_weight * CE + kd_weight * T^2 * KL(teacher_T || student_T) + crd_weight * (NCE(P_s) + NCE(P_t))

Z_s and Z_t are estimated once, on the first batch, as N times the mean of its exp(score / tau) over
the positives and negatives, then kept. After the scores, the banks move towards the batch's
embeddings: S[i] <- normalise(m S[i] + (1 - m) s_i), the same for M with t_i (momentum m = 0.5).
The banks start uniform in [-a, a], a = 1 / sqrt(feat_dim / 3).

The banks, Z and the negatives' generator are the objective's state: checkpointed and resumed exactly.
Under torchrun every process keeps the same state, that of one process with the whole batch.
"""

import logging
import math

import torch
import torch.nn.functional as F
from torch import nn

from kdrun import distributed
from kdrun.data.memory import MEMORY_SHARE, available_host_bytes
from kdrun.errors import KdrunError
from kdrun.models.features import PENULTIMATE
from kdrun.objectives.base import Objective
from kdrun.objectives.feature_kd import check_weights, logit_terms, penultimate_needs

log = logging.getLogger("kdrun")

EPS = 1e-7  # the authors' ContrastLoss


def bank_init(n_rows, dim, generator):
    """A bank [n_rows, dim] uniform in [-a, a], a = 1 / sqrt(dim / 3) (the authors' ContrastMemory)."""
    a = 1.0 / math.sqrt(dim / 3)
    return torch.rand(n_rows, dim, generator=generator).mul_(2 * a).add_(-a)


def update_bank(bank, rows, embeddings, momentum):
    """bank[rows] <- normalise(momentum * bank[rows] + (1 - momentum) * embeddings), in place."""
    mixed = bank.index_select(0, rows).mul(momentum).add_(embeddings.detach().to(bank.dtype), alpha=1 - momentum)
    bank.index_copy_(0, rows, mixed / mixed.norm(dim=1, keepdim=True))


def draw_negatives(rows, n_rows, k, generator):
    """[B, k] rows drawn uniformly, with replacement, from the n_rows rows other than each example's own."""
    draw = torch.randint(0, n_rows - 1, (len(rows), k), generator=generator).to(rows.device)
    return draw + (draw >= rows[:, None]).long()  # skip the own row: rows 0..n-2 map onto the others


def contrast_scores(bank, anchors, candidates, tau):
    """exp(<bank[candidates[b, k]], anchors[b]> / tau), [B, K + 1] (candidates: positive first)."""
    weights = bank.index_select(0, candidates.reshape(-1)).view(*candidates.shape, -1).detach()
    return torch.exp(torch.bmm(weights, anchors.unsqueeze(2)).squeeze(2) / tau)


def nce_loss(p, n_rows, eps=EPS):
    """The NCE loss of normalised scores p [B, K + 1] (the positive first) against the uniform noise
    distribution over n_rows rows (the authors' ContrastLoss, eq. 18)."""
    m, noise = p.shape[1] - 1, 1.0 / n_rows
    log_pos = torch.log(p[:, 0] / (p[:, 0] + m * noise + eps))
    log_neg = torch.log((m * noise) / (p[:, 1:] + m * noise + eps))
    return -(log_pos.sum() + log_neg.sum()) / p.shape[0]


class Embed(nn.Module):
    """A linear map to feat_dim, then L2 normalisation (the authors' Embed)."""

    def __init__(self, dim_in, dim_out):
        super().__init__()
        self.linear = nn.Linear(dim_in, dim_out)

    def forward(self, x):
        return F.normalize(self.linear(x.flatten(1)), dim=1)


def bank_bytes(n_rows, feat_dim):
    """The two banks' size in bytes (float32)."""
    return 2 * n_rows * feat_dim * 4


def _gb(n):
    return f"{n / 2**30:.3g} GiB" if n >= 2**30 else f"{n / 2**20:.3g} MiB"


def check_memory(n_rows, feat_dim, device, max_memory_gb=None):
    """Refuse banks that would not fit: over loss.max_memory_gb, or by default over half the device's
    free memory (the host's available memory for the CPU; the meta device of a preflight: the host's)."""
    need = bank_bytes(n_rows, feat_dim)
    if max_memory_gb is not None:
        limit, what = max_memory_gb * 2**30, f"loss.max_memory_gb={max_memory_gb}"
    else:
        free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else available_host_bytes()
        limit, what = MEMORY_SHARE * free, f"half the free memory of {device.type if device.type != 'meta' else 'cpu'}"
    if need > limit:
        raise KdrunError(f"loss=crd: the memory banks need {_gb(need)} (2 x {n_rows} rows x {feat_dim} x 4 bytes), "
                         f"over {_gb(limit)} ({what}); lower loss.feat_dim or raise loss.max_memory_gb")
    return need


class CRD(Objective):
    """CE + crd_weight * (student-anchor NCE + teacher-anchor NCE), optionally + Hinton KD (see the
    module docstring). The teacher runs online; the two embedding heads train with the student (at
    `lr` when set); the banks need the number of rows of the train split (`attach(..., n_rows=)`)."""

    uses_teacher = True
    teacher_features = student_features = (PENULTIMATE,)
    uses_rows = True

    def __init__(self, temperature, teacher=None, feat_dim=128, nce_k=16384, nce_t=0.07, nce_m=0.5, ce_weight=1.0,
                 kd_weight=0.0, crd_weight=0.8, seed=0, max_memory_gb=None, lr=None):
        super().__init__(lr=lr)
        if teacher is None:
            raise ValueError("CRD needs a teacher")
        check_weights(ce_weight=ce_weight, kd_weight=kd_weight, crd_weight=crd_weight)
        for name, value in (("feat_dim", feat_dim), ("nce_k", nce_k)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if isinstance(nce_t, bool) or not isinstance(nce_t, (int, float)) or not nce_t > 0:
            raise ValueError(f"nce_t must be a number > 0, got {nce_t!r}")
        if isinstance(nce_m, bool) or not isinstance(nce_m, (int, float)) or not 0 <= nce_m < 1:
            raise ValueError(f"nce_m must be a number in [0, 1), got {nce_m!r}")
        if max_memory_gb is not None and (isinstance(max_memory_gb, bool) or
                                          not isinstance(max_memory_gb, (int, float)) or not max_memory_gb > 0):
            raise ValueError(f"max_memory_gb must be a number > 0 or null, got {max_memory_gb!r}")
        self.temperature, self.teacher = temperature, teacher
        self.feat_dim, self.nce_k, self.nce_t, self.nce_m = int(feat_dim), int(nce_k), float(nce_t), float(nce_m)
        self.ce_weight, self.kd_weight, self.crd_weight = float(ce_weight), float(kd_weight), float(crd_weight)
        self.max_memory_gb = max_memory_gb
        self.generator = torch.Generator().manual_seed(int(seed) + 2)  # not the data order's stream
        self.embed_s = self.embed_t = None
        self.n_rows = self.k = None

    @classmethod
    def needs(cls, cfg=None):
        return penultimate_needs(cfg)

    def get_extra_state(self):
        return {"generator": self.generator.get_state()}

    def set_extra_state(self, state):
        self.generator.set_state(state["generator"])

    def attach(self, tap, example, n_rows=None):
        super().attach(tap, example)
        if n_rows is None or n_rows < 2:
            raise KdrunError(f"loss=crd needs a train split of at least 2 rows for its memory banks, got {n_rows}")
        need = check_memory(n_rows, self.feat_dim, example.device, self.max_memory_gb)
        s = self.student_shapes(example)[PENULTIMATE]
        t = self.teacher_shapes(example)[PENULTIMATE]
        device = example.device
        self.embed_s = Embed(math.prod(s[1:]), self.feat_dim).to(device)
        self.embed_t = Embed(math.prod(t[1:]), self.feat_dim).to(device)
        self.n_rows, self.k = int(n_rows), min(self.nce_k, int(n_rows) - 1)
        if device.type == "meta":  # a preflight: shapes and memory checked, nothing allocated
            banks = [torch.empty(n_rows, self.feat_dim, device=device) for _ in range(2)]
        else:
            banks = [bank_init(n_rows, self.feat_dim, self.generator).to(device) for _ in range(2)]
            log.info("loss=crd: two memory banks of %d rows x %d, %s on %s; %d negatives an example", n_rows,
                     self.feat_dim, _gb(need), device, self.k)
        self.register_buffer("bank_s", banks[0])  # the student's embeddings
        self.register_buffer("bank_t", banks[1])  # the teacher's
        self.register_buffer("z", torch.full((2,), -1.0, device=device))  # Z_s, Z_t; < 0: not yet estimated

    def contrast(self, s, t, rows):
        """(P_s, P_t): the normalised scores of the student and teacher anchors [B, K + 1], the banks
        updated afterwards, Z estimated on the first call."""
        # under torchrun each process holds a shard of the batch: every process draws the whole batch's
        # negatives and updates Z and its banks with the whole batch, so they stay one process's
        every_row = distributed.gather(rows)
        start, stop = distributed.bounds(len(every_row), distributed.rank(), distributed.world_size())
        negatives = draw_negatives(every_row, self.n_rows, self.k, self.generator)[start:stop]
        candidates = torch.cat([rows[:, None], negatives], 1)
        out_s = contrast_scores(self.bank_t, s, candidates, self.nce_t)  # student anchor, teacher's bank
        out_t = contrast_scores(self.bank_s, t, candidates, self.nce_t)  # teacher anchor, student's bank
        with torch.no_grad():
            for i, out in enumerate((out_s, out_t)):
                if self.z[i] < 0:
                    self.z[i] = distributed.gather(out).mean() * self.n_rows
            update_bank(self.bank_s, every_row, distributed.gather(s), self.nce_m)
            update_bank(self.bank_t, every_row, distributed.gather(t), self.nce_m)
        return out_s / self.z[0], out_t / self.z[1]

    def forward(self, model, batch, progress):
        T = self.temperature(progress)
        logits, feats = self.student_outputs(model, batch.x)
        teacher_logits, teacher_feats = self.teacher.outputs(batch)
        s = self.embed_s(feats[PENULTIMATE].float())
        t = self.embed_t(teacher_feats[PENULTIMATE].float())
        p_s, p_t = self.contrast(s, t, batch.idx)
        crd_s, crd_t = nce_loss(p_s, self.n_rows), nce_loss(p_t, self.n_rows)
        loss, logs = logit_terms(logits, teacher_logits, batch.y, T, self.ce_weight, self.kd_weight)
        loss = loss + self.crd_weight * (crd_s + crd_t)
        return logits, loss, {**logs, "crd_student": crd_s.detach(), "crd_teacher": crd_t.detach(), "T": T}
