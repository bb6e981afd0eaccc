"""Properties of the methods' losses (kdrun/objectives/<method>.py): values by hand on small tensors,
the papers' identities, and the invariances that hold."""

import math

import pytest
import torch
import torch.nn.functional as F

from kdrun.data.batches import Batch
from kdrun.losses import hinton_loss, kd_kl, zscore
from kdrun.objectives.dist import DIST, dist_loss, inter_class_relation, intra_class_relation, pearson
from kdrun.objectives.dkd import DKD, dkd_loss, dkd_terms, warmup_factor
from kdrun.objectives.hinton import HintonKD
from kdrun.objectives.rkd import RKD, angle_relation, distance_relation, rkd_angle_loss, rkd_distance_loss
from kdrun.objectives.sp import SimilarityPreserving, similarity_matrix, sp_loss
from kdrun.schedules import Constant


pytestmark = pytest.mark.usefixtures("float64")  # conftest: float64 by default


def logits(b=8, n=5, seed=0, scale=3.0):
    return torch.randn(b, n, generator=torch.Generator().manual_seed(seed)) * scale


def labels(b=8, n=5, seed=0):
    return torch.randint(0, n, (b,), generator=torch.Generator().manual_seed(seed + 50))


def kl(p, q):
    return (p * (p / q).log()).sum(-1)


# ---------------------------------------------------------------------------------------------- DKD


def test_dkd_terms_by_hand_on_one_example():
    s, t, y, T = torch.tensor([[1.0, 2.0, 0.0]]), torch.tensor([[3.0, 0.0, 1.0]]), torch.tensor([0]), 2.0
    p = torch.exp(t / T) / torch.exp(t / T).sum()  # teacher at T
    q = torch.exp(s / T) / torch.exp(s / T).sum()
    tckd_hand = kl(torch.stack([p[0, 0], 1 - p[0, 0]]), torch.stack([q[0, 0], 1 - q[0, 0]]))
    p_rest, q_rest = p[0, 1:] / p[0, 1:].sum(), q[0, 1:] / q[0, 1:].sum()
    nckd_hand = kl(p_rest, q_rest)
    tckd, nckd = dkd_terms(s, t, y, T)
    assert torch.allclose(tckd, tckd_hand.reshape(1)) and torch.allclose(nckd, nckd_hand.reshape(1))
    loss, tckd_logged, nckd_logged = dkd_loss(s, t, y, T, tckd_weight=0.5, nckd_weight=3.0)
    assert torch.allclose(loss, T * T * (0.5 * tckd_hand + 3.0 * nckd_hand))
    assert torch.allclose(tckd_logged, T * T * tckd_hand) and torch.allclose(nckd_logged, T * T * nckd_hand)


def mdistiller_style_dkd(s, t, y, T, alpha, beta):
    """The official code's computation (a -1000 mask on the target's tempered logit for NCKD),
    written out here to check that dropping the target class exactly gives the same loss."""
    gt = F.one_hot(y, s.shape[1]).double()
    ps, pt = F.softmax(s / T, 1), F.softmax(t / T, 1)
    bs = torch.stack([(ps * gt).sum(1), (ps * (1 - gt)).sum(1)], 1)
    bt = torch.stack([(pt * gt).sum(1), (pt * (1 - gt)).sum(1)], 1)
    tckd = F.kl_div(bs.log(), bt, reduction="sum") * T * T / len(y)
    nckd = F.kl_div(F.log_softmax(s / T - 1000 * gt, 1), F.softmax(t / T - 1000 * gt, 1), reduction="sum") * T * T / len(y)
    return alpha * tckd + beta * nckd


@pytest.mark.parametrize("T", [1.0, 4.0])
def test_dkd_equals_the_official_masked_computation(T):
    s, t, y = logits(16, 10), logits(16, 10, seed=1), labels(16, 10)
    loss, _, _ = dkd_loss(s, t, y, T, 1.0, 8.0)
    assert torch.allclose(loss, mdistiller_style_dkd(s, t, y, T, 1.0, 8.0), rtol=1e-10)


@pytest.mark.parametrize("T", [1.0, 3.0, 8.0])
def test_tckd_plus_teacher_weighted_nckd_is_hinton_kd(T):
    """The paper's identity KD = TCKD + (1 - p_t) NCKD holds with p_t the teacher's target probability at T."""
    s, t, y = logits(16, 10), logits(16, 10, seed=1), labels(16, 10)
    p_t = F.softmax(t / T, 1).gather(1, y[:, None]).squeeze(1)
    loss, _, _ = dkd_loss(s, t, y, T, tckd_weight=1.0, nckd_weight=1 - p_t)
    assert torch.allclose(loss, T * T * kd_kl(s, t, T), rtol=1e-10)
    q_t = F.softmax(s / T, 1).gather(1, y[:, None]).squeeze(1)  # the student's p_t does not recombine
    wrong, _, _ = dkd_loss(s, t, y, T, tckd_weight=1.0, nckd_weight=1 - q_t)
    assert not torch.allclose(wrong, T * T * kd_kl(s, t, T), rtol=1e-3)


def test_nckd_is_zero_with_two_classes_and_its_gradient_finite():
    s, t, y = logits(8, 2).requires_grad_(), logits(8, 2, seed=1), labels(8, 2)
    tckd, nckd = dkd_terms(s, t, y, 4.0)
    assert torch.equal(nckd, torch.zeros(8))
    assert torch.allclose(tckd, kd_kl(s, t, 4.0) * 0 + kl(F.softmax(t / 4, 1), F.softmax(s / 4, 1)))  # 2 classes: TCKD is KD
    loss, _, _ = dkd_loss(s, t, y, 4.0)
    loss.backward()
    assert torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0


def test_tckd_is_finite_when_the_target_probability_rounds_to_one():
    s, t, y = torch.tensor([[0.0, -200.0, -200.0]]), torch.tensor([[0.0, -150.0, -190.0]]), torch.tensor([0])
    tckd, nckd = dkd_terms(s.float(), t.float(), y, 1.0)  # float32: 1 - p_t is exactly 0 there
    assert torch.isfinite(tckd).all() and torch.isfinite(nckd).all()


def test_dkd_refuses_a_single_class():
    with pytest.raises(ValueError, match="DKD needs at least 2 classes, got 1"):
        dkd_terms(torch.zeros(2, 1), torch.zeros(2, 1), torch.zeros(2, dtype=torch.long), 4.0)


def test_warmup_is_mdistillers_per_epoch_ramp():
    steps_per_epoch, epochs = 7, 30
    factors = [warmup_factor(step / (epochs * steps_per_epoch), 20, epochs) for step in range(epochs * steps_per_epoch)]
    by_epoch = [factors[e * steps_per_epoch: (e + 1) * steps_per_epoch] for e in range(epochs)]
    for e, within in enumerate(by_epoch):
        assert within == [min((e + 1) / 20, 1.0)] * steps_per_epoch, e  # constant within an epoch, from 1/20
    assert warmup_factor(0.0, 0, 30) == 1.0  # no warm-up


class Fixed:
    """A model whose output is given (the objective's forward only calls it)."""

    def __init__(self, z):
        self.z = z

    def __call__(self, x):
        return self.z


def test_dkd_objective_combines_ce_and_warmed_up_terms():
    s, t, y = logits(), logits(seed=1), labels()
    cache = lambda batch, T=None: t  # noqa: E731
    objective = DKD(Constant(4.0), teacher=cache, tckd_weight=2.0, nckd_weight=8.0, ce_weight=0.5, warmup_epochs=4,
                    epochs=10)
    batch = Batch(torch.zeros(8, 1), y, torch.arange(8))
    _, loss, logs = objective(Fixed(s), batch, 0.15)  # epoch 2 of 10: warm-up factor 2/4
    kd, _, _ = dkd_loss(s, t, y, 4.0, 2.0, 8.0)
    assert torch.allclose(loss, 0.5 * F.cross_entropy(s, y) + 0.5 * kd)
    assert logs["warmup"] == 0.5 and logs["T"] == 4.0


@pytest.mark.parametrize("bad, message", [
    ({"teacher": None}, "DKD needs a teacher (kdrun gives it one unless alpha=0)"),
    ({"nckd_weight": -1}, "nckd_weight must be a number >= 0, got -1"),
    ({"tckd_weight": "high"}, "tckd_weight must be a number >= 0, got 'high'"),
    ({"epochs": 0}, "epochs must be an integer >= 1, got 0"),
    ({"standardize": "yes"}, "standardize must be true or false, got 'yes'"),
])
def test_dkd_refuses_bad_knobs(bad, message):
    kwargs = {"teacher": lambda batch, T=None: None, **bad}
    with pytest.raises(ValueError, match=f"^{message.replace('(', '[(]').replace(')', '[)]')}$"):
        DKD(Constant(4.0), **kwargs)


# ---------------------------------------------------------------------------------------------- DIST


def test_dist_relations_by_hand():
    y_s = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6]])
    y_t = torch.tensor([[0.6, 0.3, 0.1], [0.2, 0.2, 0.6]])

    def r(a, b):  # Pearson by its definition
        a, b = a - a.mean(), b - b.mean()
        return (a * b).sum() / math.sqrt((a * a).sum() * (b * b).sum())

    inter = 1 - (r(y_s[0], y_t[0]) + r(y_s[1], y_t[1])) / 2
    intra = 1 - sum(r(y_s[:, j], y_t[:, j]) for j in range(3)) / 3
    tol = 1e-5  # the official eps (1e-8 added to a product of norms of about 0.005 here)
    assert inter_class_relation(y_s, y_t) == pytest.approx(float(inter), abs=tol)
    assert intra_class_relation(y_s, y_t) == pytest.approx(float(intra), abs=tol)
    assert float(intra) == pytest.approx(1 - 1 / 3)  # columns correlate +1, -1, +1
    z_s, z_t = y_s.log(), y_t.log()  # softmax(log y) = y
    loss, _, _ = dist_loss(z_s, z_t, tau=1.0, inter_weight=2.0, intra_weight=3.0)
    assert loss == pytest.approx(float(2 * inter + 3 * intra), abs=5 * tol)
    loss2, _, _ = dist_loss(2 * z_s, 2 * z_t, tau=2.0, inter_weight=2.0, intra_weight=3.0)
    assert loss2 == pytest.approx(4 * float(loss), rel=1e-12)  # the tau^2 factor


def test_dist_is_zero_when_student_equals_teacher():
    z = logits(16, 10)
    loss, inter, intra = dist_loss(z, z.clone(), tau=4.0)
    assert 0 <= float(loss) < 1e-4  # zero but for the official eps, 1e-8 over squared norms of about 1e-2
    y = F.softmax(z / 4.0, 1)
    assert torch.allclose(pearson(y, y, eps=0.0), torch.ones(16), atol=1e-12)
    assert torch.allclose(pearson(y.t(), y.t(), eps=0.0), torch.ones(10), atol=1e-12)
    assert float(dist_loss(z, logits(16, 10, seed=1), tau=4.0)[0]) > 0.1


def test_dist_invariances_that_hold_and_one_that_does_not():
    z_s, z_t, tau = logits(16, 10), logits(16, 10, seed=1), 2.0
    base = float(dist_loss(z_s, z_t, tau)[0])
    shift_s, shift_t = logits(16, 1, seed=2) * 10, logits(16, 1, seed=3) * 10  # per example
    assert float(dist_loss(z_s + shift_s, z_t + shift_t, tau)[0]) == pytest.approx(base, rel=1e-9)
    # a positive affine map of the probabilities leaves both relations unchanged
    y_s, y_t = F.softmax(z_s / tau, 1), F.softmax(z_t / tau, 1)
    for a, b in ((3.0, 0.5), (0.2, -0.1)):
        assert float(inter_class_relation(a * y_s + b, y_t)) == pytest.approx(float(inter_class_relation(y_s, y_t)), abs=1e-6)
        assert float(intra_class_relation(y_s, a * y_t + b)) == pytest.approx(float(intra_class_relation(y_s, y_t)), abs=1e-6)
    # ... but scaling the logits changes the softened probabilities' shape, so the loss changes
    assert float(dist_loss(3.0 * z_s, z_t, tau)[0]) != pytest.approx(base, rel=1e-2)


def test_pearson_of_a_batch_of_one_is_zero_not_nan():
    y = F.softmax(logits(1, 10), 1)
    assert float(intra_class_relation(y, y)) == 1.0  # one example: no spread across the batch
    assert torch.isfinite(pearson(y.t(), y.t())).all()


def test_dist_objective_adds_ce_and_leaves_it_out_without_labels():
    s, t, y = logits(), logits(seed=1), labels()
    objective = DIST(Constant(2.0), teacher=lambda batch, T=None: t, inter_weight=1.0, intra_weight=0.5, ce_weight=3.0)
    _, loss, logs = objective(Fixed(s), Batch(torch.zeros(8, 1), y, torch.arange(8)), 0.0)
    kd, _, _ = dist_loss(s, t, 2.0, 1.0, 0.5)
    assert torch.allclose(loss, 3.0 * F.cross_entropy(s, y) + kd) and set(logs) == {"ce", "inter", "intra", "T"}
    _, unlabelled, logs = objective(Fixed(s), Batch(torch.zeros(8, 1), None, torch.arange(8)), 0.0)
    assert torch.allclose(unlabelled, kd) and "ce" not in logs
    assert DIST.needs().labels is False and DKD.needs().labels is True


# ------------------------------------------------------------------------------ logit standardisation


def test_zscore_has_mean_zero_and_unit_std_per_example():
    z = zscore(logits(16, 10))
    assert torch.allclose(z.mean(1), torch.zeros(16), atol=1e-12)
    assert torch.allclose(z.std(1), torch.ones(16), atol=1e-6)


@pytest.mark.parametrize("which", ["hinton", "dkd"])
def test_standardized_soft_terms_ignore_per_example_shift_and_scale(which):
    s, t, y, T = logits(16, 10), logits(16, 10, seed=1), labels(16, 10), 2.0
    shift, scale = logits(16, 1, seed=2) * 10, torch.rand(16, 1, generator=torch.Generator().manual_seed(3)) * 5 + 0.1

    def soft(a, b, standardize):
        if which == "hinton":
            return hinton_loss(a, b, None, T, 1.0, standardize)[0]
        return dkd_loss(zscore(a), zscore(b), y, T)[0] if standardize else dkd_loss(a, b, y, T)[0]

    base = soft(s, t, True)
    assert torch.allclose(soft(s * scale + shift, t, True), base, rtol=1e-6)
    assert torch.allclose(soft(s, t * scale + shift, True), base, rtol=1e-6)
    assert not torch.allclose(soft(s * scale, t, False), soft(s, t, False), rtol=1e-2)  # raw logits: not invariant


def test_standardize_keeps_the_hard_term_on_raw_logits():
    s, t, y, T, alpha = logits(), logits(seed=1), labels(), 2.0, 0.4
    total, parts = hinton_loss(s, t, y, T, alpha, standardize=True)
    assert torch.allclose(parts["ce"], F.cross_entropy(s, y))
    assert torch.allclose(total, alpha * T * T * kd_kl(zscore(s), zscore(t), T) + (1 - alpha) * F.cross_entropy(s, y))
    objective = HintonKD(Constant(T), Constant(alpha), teacher=lambda batch, T=None: t, standardize=True)
    _, loss, _ = objective(Fixed(s), Batch(torch.zeros(8, 1), y, torch.arange(8)), 0.0)
    assert torch.allclose(loss, total)


def test_dkd_objective_standardizes_both_sides():
    s, t, y = logits(), logits(seed=1), labels()
    objective = DKD(Constant(2.0), teacher=lambda batch, T=None: t, warmup_epochs=0, standardize=True)
    _, loss, _ = objective(Fixed(s), Batch(torch.zeros(8, 1), y, torch.arange(8)), 0.0)
    assert torch.allclose(loss, F.cross_entropy(s, y) + dkd_loss(zscore(s), zscore(t), y, 2.0)[0])


# ---------------------------------------------------------------------------------------------- RKD


def embeddings(b=6, d=4, seed=0):
    return torch.randn(b, d, generator=torch.Generator().manual_seed(seed + 200))


def rotation(d, seed=0):
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=torch.Generator().manual_seed(seed + 300)))
    return q


def test_rkd_relations_by_hand_on_three_points():
    e = torch.tensor([[0.0, 0.0], [3.0, 0.0], [0.0, 4.0]])  # a 3-4-5 right triangle
    mu = (3 + 4 + 5) * 2 / 6
    expected = torch.tensor([[0, 3, 4], [3, 0, 5], [4, 5, 0]]) / mu
    assert torch.allclose(distance_relation(e), expected, atol=1e-6)
    angles = angle_relation(e)
    assert angles[0, 1, 2] == pytest.approx(0.0, abs=1e-12)  # the right angle at e_0
    assert angles[1, 0, 2] == pytest.approx(3 / 5)  # at e_1, between e_0 and e_2: cos = 3/5
    assert angles[2, 0, 1] == pytest.approx(4 / 5)
    assert angles[0, 0, 1] == 0  # a degenerate pair gives 0
    assert float(rkd_distance_loss(e, e)) == 0 and float(rkd_angle_loss(e, e)) == 0
    halved = e * torch.tensor([1.0, 0.5])  # the triangle (0, 0), (3, 0), (0, 2): sides 3, 2 and sqrt(13)
    sides = torch.tensor([[0, 3, 2], [3, 0, math.sqrt(13)], [2, math.sqrt(13), 0]])
    diff = (sides / (sides.sum() / 6) - expected).abs()
    huber = torch.where(diff < 1, 0.5 * diff ** 2, diff - 0.5).mean()  # smooth L1 over all 9 entries
    assert float(rkd_distance_loss(halved, e)) == pytest.approx(float(huber), rel=1e-6)


def test_rkd_is_invariant_to_rotation_translation_and_scale():
    s, t = embeddings(8, 5), embeddings(8, 3, seed=1)  # the sizes may differ
    d0, a0 = rkd_distance_loss(s, t), rkd_angle_loss(s, t)
    assert float(d0) > 0 and float(a0) > 0
    moved = s @ rotation(5) + torch.randn(1, 5, generator=torch.Generator().manual_seed(9)) * 10
    assert torch.allclose(rkd_distance_loss(moved, t), d0, rtol=1e-9)
    assert torch.allclose(rkd_angle_loss(moved, t), a0, rtol=1e-9)
    assert torch.allclose(rkd_distance_loss(s, t @ rotation(3, 1) - 4.0), d0, rtol=1e-9)
    assert torch.allclose(rkd_distance_loss(7.5 * s, t), d0, rtol=1e-9)  # distances over their mean
    assert torch.allclose(rkd_angle_loss(7.5 * s, 0.1 * t), a0, rtol=1e-9)
    assert not torch.allclose(rkd_distance_loss(s * torch.tensor([1.0, 3, 1, 1, 1]), t), d0, rtol=1e-3)  # a stretch


def test_rkd_of_a_batch_of_one_is_zero_not_nan():
    s = embeddings(1, 4).requires_grad_()
    loss = rkd_distance_loss(s, embeddings(1, 3)) + rkd_angle_loss(s, embeddings(1, 3))
    loss.backward()
    assert float(loss.detach()) == 0 and torch.equal(s.grad, torch.zeros_like(s))


def test_rkd_objective_sums_its_weighted_terms():
    s, t, z, y = embeddings(6, 4), embeddings(6, 3, seed=1), logits(6, 5), labels(6, 5)

    class Teacher:
        def outputs(self, batch):
            return logits(6, 5, seed=1), {"penultimate": t}

    objective = RKD(Constant(4.0), teacher=Teacher(), distance_weight=2.0, angle_weight=3.0)
    objective.student_outputs = lambda model, x: (z, {"penultimate": s})
    _, loss, logs = objective(None, Batch(torch.zeros(6, 1), y, torch.arange(6)), 0.0)
    expected = F.cross_entropy(z, y) + 2.0 * rkd_distance_loss(s, t) + 3.0 * rkd_angle_loss(s, t)
    assert torch.allclose(loss, expected) and {"ce", "rkd_distance", "rkd_angle"} <= logs.keys()
    assert RKD.needs().teacher_features == ("penultimate",) and RKD.needs().online_teacher


# ----------------------------------------------------------------------------- similarity preserving


def test_sp_by_hand_on_two_examples():
    a = torch.tensor([[1.0, 0.0], [0.0, 2.0]])  # orthogonal: Q Q^T = diag(1, 4), rows normalised: I
    b = torch.tensor([[1.0, 1.0], [1.0, 1.0]])  # equal: Q Q^T = all 2, rows normalised: all 1/sqrt(2)
    assert torch.allclose(similarity_matrix(a), torch.eye(2))
    g = 1 / math.sqrt(2)
    expected = (2 * (1 - g) ** 2 + 2 * g ** 2) / 4  # |G_t - G_s|_F^2 / b^2, b = 2
    assert float(sp_loss(a, b)) == pytest.approx(expected)
    # the batch doubled (b = 4): rows of G_s are [1, 0, 1, 0] / sqrt(2) or [0, 1, 0, 1] / sqrt(2), of G_t all 1/2
    doubled = 4 * (2 * (g - 0.5) ** 2 + 2 * 0.5 ** 2) / 16
    assert float(sp_loss(torch.cat([a, a]), torch.cat([b, b]))) == pytest.approx(doubled)


def test_sp_is_zero_for_identical_features_and_sees_only_the_batch_relations():
    f = torch.randn(8, 4, 3, 3, generator=torch.Generator().manual_seed(1))
    assert float(sp_loss(f, f.clone())) == 0
    assert float(sp_loss(f, 5.0 * f)) == pytest.approx(0.0, abs=1e-12)  # the rows are normalised
    wide = torch.randn(8, 16, generator=torch.Generator().manual_seed(2))  # another size: only b x b is compared
    assert float(sp_loss(f, wide)) > 0


def test_sp_objective_pairs_stages_and_weights_them():
    fs = {"a": torch.randn(5, 3), "b": torch.randn(5, 2, 2, 2)}
    ft = {"x": torch.randn(5, 7), "y": torch.randn(5, 4)}
    z, y = logits(5, 5), labels(5, 5)

    class Teacher:
        def outputs(self, batch):
            return logits(5, 5, seed=1), ft

    objective = SimilarityPreserving(Constant(4.0), Teacher(), student_stages=["a", "b"], teacher_stages=["x", "y"],
                                     gamma=10.0)
    objective.student_outputs = lambda model, x: (z, fs)
    _, loss, logs = objective(None, Batch(torch.zeros(5, 1), y, torch.arange(5)), 0.0)
    expected = F.cross_entropy(z, y) + 10.0 * (sp_loss(fs["a"], ft["x"]) + sp_loss(fs["b"], ft["y"]))
    assert torch.allclose(loss, expected) and {"sp_0", "sp_1"} <= logs.keys()
    need = SimilarityPreserving.needs({"student_stages": ["a", "b"], "teacher_stages": ["x", "y"]})
    assert (need.student_features, need.teacher_features) == (("a", "b"), ("x", "y"))
    with pytest.raises(ValueError, match=r"student_stages \['a'\] and teacher_stages \['x', 'y'\] must pair up"):
        SimilarityPreserving(Constant(4.0), Teacher(), student_stages=["a"], teacher_stages=["x", "y"])
