"""Probabilistic knowledge transfer: the loss by hand on a tiny batch, the invariances of cosine
similarities, its zero, and the objective's total."""

import math

import pytest
import torch
import torch.nn.functional as F

from kdrun.data.batches import Batch
from kdrun.objectives.pkt import PKT, conditional_probabilities, pkt_loss
from kdrun.schedules import Constant


def features(b, d, seed=0):
    return torch.randn(b, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_pkt_by_hand_on_two_examples():
    student = torch.tensor([[1.0, 0.0], [0.0, 3.0]], dtype=torch.float64)  # orthogonal: cos 0, kernel 1/2
    teacher = torch.tensor([[2.0, 0.0], [1.0, 0.0]], dtype=torch.float64)  # parallel: cos 1, kernel 1
    p_s = conditional_probabilities(student)
    assert torch.allclose(p_s, torch.tensor([[2 / 3, 1 / 3], [1 / 3, 2 / 3]], dtype=torch.float64))
    assert torch.allclose(conditional_probabilities(teacher), torch.full((2, 2), 0.5, dtype=torch.float64))
    # rows: 1/2 log((1/2) / (2/3)) + 1/2 log((1/2) / (1/3)), twice; the mean over the 4 entries
    expected = 2 * (0.5 * math.log(0.75) + 0.5 * math.log(1.5)) / 4
    assert float(pkt_loss(student, teacher, eps=0.0)) == pytest.approx(expected, rel=1e-12)
    assert float(pkt_loss(student, teacher)) == pytest.approx(expected, rel=1e-6)  # the authors' eps changes little


def test_pkt_is_zero_for_the_same_relations_and_positive_otherwise():
    f = features(8, 5)
    assert float(pkt_loss(f, f.clone())) == pytest.approx(0.0, abs=1e-15)
    assert float(pkt_loss(features(8, 5, seed=1), f)) > 0
    assert float(pkt_loss(f, features(8, 12, seed=2))) > 0  # other widths: only b x b distributions meet


def test_pkt_is_invariant_to_rotations_and_per_example_scales_of_either_side():
    s, t = features(7, 4), features(7, 6, seed=1)
    q, _ = torch.linalg.qr(features(4, 4, seed=3))  # an orthogonal map keeps every cosine
    scale = torch.rand(7, 1, generator=torch.Generator().manual_seed(4), dtype=torch.float64) * 5 + 0.1
    base = pkt_loss(s, t)
    assert torch.allclose(pkt_loss(s @ q, t), base)
    assert torch.allclose(pkt_loss(s * scale, t), base)
    assert torch.allclose(pkt_loss(s, 3.0 * t), base)
    # a translation is not a symmetry: cosines are taken about the origin
    assert not torch.allclose(pkt_loss(s + 2.0, t), base)


def test_a_zero_embedding_is_left_zero_not_nan():
    s = torch.cat([torch.zeros(1, 3, dtype=torch.float64), features(3, 3)])
    assert torch.isfinite(pkt_loss(s, features(4, 3, seed=1)))


def test_pkt_objective_is_ce_plus_its_weighted_term():
    s, t = torch.randn(6, 4), torch.randn(6, 9)
    z, y = torch.randn(6, 5), torch.tensor([0, 1, 2, 3, 4, 0])

    class Teacher:
        def outputs(self, batch):
            return torch.randn(6, 5), {"penultimate": t}

    objective = PKT(Constant(4.0), Teacher(), pkt_weight=50.0)
    objective.student_outputs = lambda model, x: (z, {"penultimate": s})
    _, loss, logs = objective(None, Batch(torch.zeros(6, 1), y, torch.arange(6)), 0.0)
    assert torch.allclose(loss, F.cross_entropy(z, y) + 50.0 * pkt_loss(s, t))
    assert {"ce", "pkt", "T"} <= logs.keys()
    need = PKT.needs()
    assert need.teacher_features == need.student_features == ("penultimate",) and need.labels
    assert not PKT.needs({"ce_weight": 0.0}).labels
    with pytest.raises(ValueError, match="pkt_weight must be a number >= 0, got -1"):
        PKT(Constant(4.0), Teacher(), pkt_weight=-1)
