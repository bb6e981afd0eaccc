"""Self-distillation (DDGSD) and mutual learning: each loss term by hand, the MMD's properties, and the
two distorted views."""

import math
import re

import pytest
import torch
import torch.nn.functional as F

from kdrun.data.batches import Batch, DeviceData
from kdrun.distortions import Distortions, random_erase
from kdrun.ensemble import Ensemble
from kdrun.losses import mmd, symmetric_kl
from kdrun.models import MLP
from kdrun.objectives import MutualLearning, SelfDistillation
from kdrun.schedules import Constant


def kl_by_hand(p, q):
    """KL(p || q) of two probability rows, summed over classes."""
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))


def softmax_by_hand(z, T):
    e = [math.exp(v / T) for v in z]
    return [v / sum(e) for v in e]


ZA = [[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]]
ZB = [[0.5, 2.5, 0.0], [1.0, -1.0, 2.0]]


# ---------------------------------------------------------------- loss terms by hand


@pytest.mark.parametrize("T", [1.0, 3.0])
def test_symmetric_kl_is_both_directions_batch_mean(T):
    expected = 0.0
    for a, b in zip(ZA, ZB):
        pa, pb = softmax_by_hand(a, T), softmax_by_hand(b, T)
        expected += (kl_by_hand(pa, pb) + kl_by_hand(pb, pa)) / len(ZA)
    got = symmetric_kl(torch.tensor(ZA), torch.tensor(ZB), T)
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_symmetric_kl_gradient_is_that_of_the_whole_loss():
    za = torch.tensor(ZA, requires_grad=True)
    zb = torch.tensor(ZB, requires_grad=True)
    symmetric_kl(za, zb, 2.0).backward()
    a, b = torch.tensor(ZA, requires_grad=True), torch.tensor(ZB, requires_grad=True)
    pa, pb = F.softmax(a / 2, -1), F.softmax(b / 2, -1)
    ((pa - pb) * (pa.log() - pb.log())).sum(-1).mean().backward()  # KL(a||b) + KL(b||a), written out
    assert torch.allclose(za.grad, a.grad, atol=1e-6) and torch.allclose(zb.grad, b.grad, atol=1e-6)


def test_symmetric_kl_with_detached_targets_teaches_each_view_from_the_other_held_fixed():
    za = torch.tensor(ZA, requires_grad=True)
    zb = torch.tensor(ZB, requires_grad=True)
    symmetric_kl(za, zb, 2.0, detach_targets=True).backward()
    # d/dz_a of KL(p_b || p_a) at T, p_b fixed: (p_a - p_b) / (T * batch)
    pa, pb = F.softmax(torch.tensor(ZA) / 2, -1), F.softmax(torch.tensor(ZB) / 2, -1)
    assert torch.allclose(za.grad, (pa - pb) / (2 * len(ZA)), atol=1e-6)
    assert torch.allclose(zb.grad, (pb - pa) / (2 * len(ZA)), atol=1e-6)


def test_symmetric_kl_is_nonnegative_and_zero_for_equal_views():
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        a, b = torch.randn(8, 5, generator=g) * 4, torch.randn(8, 5, generator=g) * 4
        assert symmetric_kl(a, b, 2.0) >= 0
    assert symmetric_kl(a, a.clone(), 2.0).item() == pytest.approx(0.0, abs=1e-6)


FA = [[1.0, 0.0], [3.0, 2.0]]
FB = [[0.0, 1.0], [2.0, 2.0]]


def test_linear_mmd_by_hand():
    # means (2, 1) and (1, 1.5): squared distance 1 + 0.25
    assert mmd(torch.tensor(FA), torch.tensor(FB)).item() == pytest.approx(1.25)


def test_gaussian_mmd_by_hand():
    sigma = 1.5

    def k(x, y):
        return math.exp(-sum((xi - yi) ** 2 for xi, yi in zip(x, y)) / (2 * sigma**2))

    def mean_k(xs, ys):
        return sum(k(x, y) for x in xs for y in ys) / (len(xs) * len(ys))

    expected = mean_k(FA, FA) + mean_k(FB, FB) - 2 * mean_k(FA, FB)
    got = mmd(torch.tensor(FA), torch.tensor(FB), "gaussian", bandwidth=sigma)
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_gaussian_mmd_median_bandwidth_by_hand():
    joint = FA + FB
    d2 = sorted(sum((a - b) ** 2 for a, b in zip(x, y)) for i, x in enumerate(joint) for j, y in enumerate(joint) if i != j)
    median = d2[(len(d2) - 1) // 2]  # torch's median of an even count is the lower middle
    expected = mmd(torch.tensor(FA), torch.tensor(FB), "gaussian", bandwidth=math.sqrt(median))
    assert mmd(torch.tensor(FA), torch.tensor(FB), "gaussian").item() == pytest.approx(expected.item(), rel=1e-6)


@pytest.mark.parametrize("kernel", ["linear", "gaussian"])
def test_mmd_is_zero_for_identical_batches_and_grows_with_a_mean_shift(kernel):
    f = torch.randn(64, 16, generator=torch.Generator().manual_seed(1))
    assert mmd(f, f.clone(), kernel).item() == pytest.approx(0.0, abs=1e-6)
    bandwidth = 4.0 if kernel == "gaussian" else None  # fixed, so the shifts are compared on one kernel
    values = [mmd(f, f + shift, kernel, bandwidth).item() for shift in (0.1, 0.5, 1.0, 2.0)]
    assert all(a < b for a, b in zip(values, values[1:])), values
    assert values[0] > 0


def test_mmd_refuses_an_unknown_kernel():
    with pytest.raises(ValueError, match="mmd kernel must be linear or gaussian, got 'cosine'"):
        mmd(torch.zeros(2, 2), torch.zeros(2, 2), "cosine")


# ---------------------------------------------------------------- the objectives' totals


class Fixed(torch.nn.Module):
    """A 'network' whose penultimate features are its input and whose head is a fixed linear map."""

    def __init__(self):
        super().__init__()
        self.head = torch.nn.Linear(2, 3)
        with torch.no_grad():
            self.head.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, -1.0]]))
            self.head.bias.zero_()

    def forward(self, x):
        return self.head(x.flatten(1))


class Views:
    """Distortions that hand out fixed views in turn."""

    def __init__(self, *views):
        self.views = list(views)

    def __call__(self, x, pixels, generator):
        return self.views.pop(0)


def test_self_distillation_total_is_the_sum_of_its_terms_by_hand():
    a, b = torch.tensor(FA), torch.tensor(FB)
    y = torch.tensor([0, 2])
    T, lam, mu = 2.0, 0.7, 0.3
    objective = SelfDistillation(Constant(T), lam, mu, Views(a, b), pixels=None)
    model = Fixed()
    za, zb = model.head(a), model.head(b)
    ce = [F.cross_entropy(z, y).item() for z in (za, zb)]
    sym = 0.0
    for ra, rb in zip(za.tolist(), zb.tolist()):
        pa, pb = softmax_by_hand(ra, T), softmax_by_hand(rb, T)
        sym += (kl_by_hand(pa, pb) + kl_by_hand(pb, pa)) / 2
    expected = ce[0] + ce[1] + lam * sym + mu * 1.25
    logits, loss, logs = objective(model, Batch(torch.zeros(2, 2), y, torch.arange(2)), 0.0)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert logs["ce_a"].item() == pytest.approx(ce[0], rel=1e-6) and logs["ce_b"].item() == pytest.approx(ce[1], rel=1e-6)
    assert logs["sym_kl"].item() == pytest.approx(sym, rel=1e-5) and logs["mmd"].item() == pytest.approx(1.25)
    assert logs["T"] == T
    assert torch.allclose(logits, za)  # view a's logits: what train accuracy counts


def test_mutual_learning_total_is_each_students_ce_plus_mean_kl_to_the_others():
    torch.manual_seed(0)
    students = [MLP([1, 2, 2], 3, [4]) for _ in range(3)]
    cohort = Ensemble(students, "arithmetic")
    x, y = torch.randn(5, 1, 2, 2), torch.tensor([0, 1, 2, 0, 1])
    T, weight = 2.0, 0.5
    _, loss, logs = MutualLearning(Constant(T), weight)(cohort, Batch(x, y, torch.arange(5)), 0.0)
    z = [s(x).detach() for s in students]
    expected = 0.0
    for i in range(3):
        kl = 0.0
        for j in range(3):
            if j != i:
                for row_i, row_j in zip(z[i].tolist(), z[j].tolist()):
                    kl += kl_by_hand(softmax_by_hand(row_j, T), softmax_by_hand(row_i, T)) / 5 / 2
        expected += F.cross_entropy(z[i], y).item() + weight * T * T * kl
        assert logs[f"kl_{i}"].item() == pytest.approx(kl, rel=1e-5)
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_mutual_learning_gradient_reaches_each_student_only_through_its_own_loss():
    """With the others' outputs held fixed, one backward of the sum gives each student exactly the
    gradient of its own loss (so one optimiser step updates them as separate optimisers would)."""
    torch.manual_seed(0)
    students = [MLP([1, 2, 2], 3, [4]) for _ in range(2)]
    x, y = torch.randn(6, 1, 2, 2), torch.tensor([0, 1, 2, 0, 1, 2])
    _, loss, _ = MutualLearning(Constant(3.0))(Ensemble(students, "arithmetic"), Batch(x, y, torch.arange(6)), 0.0)
    loss.backward()
    together = students[0].head.weight.grad.clone()
    students[0].zero_grad()
    z0, z1 = students[0](x), students[1](x).detach()
    own = F.cross_entropy(z0, y) + 9.0 * F.kl_div(F.log_softmax(z0 / 3, -1), F.log_softmax(z1 / 3, -1),
                                                  reduction="batchmean", log_target=True)
    own.backward()
    assert torch.allclose(together, students[0].head.weight.grad, atol=1e-6)


# ---------------------------------------------------------------- the views


def pixels_of(images):
    return DeviceData(images, torch.zeros(len(images), dtype=torch.long), 0.25, 0.5, "cpu")


def test_two_views_differ_and_each_is_a_shift_of_the_image():
    g = torch.Generator().manual_seed(0)
    images = torch.randint(1, 256, (16, 1, 10, 10), generator=g, dtype=torch.uint8)
    data = pixels_of(images)
    x = next(data.batches(16)).x
    distort = Distortions(shift=2)
    a, b = distort(x, data, g), distort(x, data, g)
    assert not torch.equal(a, b)
    unit = images.float() / 255
    for view in (a, b):
        seen = data.to_unit(view)
        for i in range(16):
            shifts = [F.pad(unit[i], (2, 2, 2, 2))[:, 2 + dy : 12 + dy, 2 + dx : 12 + dx]
                      for dy in range(-2, 3) for dx in range(-2, 3)]
            assert any(torch.allclose(seen[i], s, atol=1e-5) for s in shifts), i


def test_flip_views_are_the_image_or_its_mirror_and_both_occur():
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (64, 3, 6, 6), generator=g, dtype=torch.uint8)
    data = pixels_of(images)
    x = next(data.batches(64)).x
    view = Distortions(shift=0, flip=True)(x, data, g)
    same = [torch.allclose(view[i], x[i], atol=1e-5) for i in range(64)]
    mirrored = [torch.allclose(view[i], x[i].flip(-1), atol=1e-5) for i in range(64)]
    assert all(s or m for s, m in zip(same, mirrored)) and 10 < sum(same) < 54


def test_noise_views_stay_valid_pixels():
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (8, 1, 6, 6), generator=g, dtype=torch.uint8)
    data = pixels_of(images)
    x = next(data.batches(8)).x
    unit = data.to_unit(Distortions(shift=0, noise=0.3)(x, data, g))
    assert unit.min() >= -1e-6 and unit.max() <= 1 + 1e-6 and not torch.allclose(unit, images.float() / 255)


def test_erase_blacks_out_one_rectangle_per_image():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(32, 2, 12, 12, generator=g) + 0.1  # no black pixels before erasing
    out = random_erase(x, 1.0, g)
    for i in range(32):
        erased = out[i, 0] == 0
        assert torch.equal(erased, out[i, 1] == 0)  # every channel of the same rectangle
        rows, cols = erased.any(1).nonzero().flatten(), erased.any(0).nonzero().flatten()
        assert erased.sum() == len(rows) * len(cols) > 0  # a full rectangle
        assert torch.equal(out[i][:, ~erased], x[i][:, ~erased])  # nothing else changed
    assert torch.equal(random_erase(x, 0.0, g), x)


@pytest.mark.parametrize("kwargs, message", [
    ({"shift": -1}, "shift must be an integer >= 0, got -1"),
    ({"noise": -0.1}, "noise must be >= 0, got -0.1"),
    ({"erase": 1.5}, "erase must be in [0, 1], got 1.5"),
])
def test_distortions_refuse_bad_settings(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        Distortions(**kwargs)
