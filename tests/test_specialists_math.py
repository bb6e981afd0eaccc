"""Specialists with a dustbin class (Hinton et al. 2015, section 5): clusters, dustbin, combination."""

import math
import time
from dataclasses import FrozenInstanceError

import numpy as np
import pytest
import torch

from kdrun.specialists.clusters import cluster_classes, prediction_covariance
from kdrun.specialists.combine import active_specialists, combine, objective
from kdrun.specialists.dustbin import Specialty


def flat_dirichlet(rows, cols, generator):
    """Rows drawn uniformly from the simplex (normalised exponentials), float64."""
    e = -torch.rand(rows, cols, generator=generator, dtype=torch.float64).clamp_min(1e-300).log()
    return e / e.sum(dim=1, keepdim=True)


def random_probs(rows, cols, seed):
    return flat_dirichlet(rows, cols, torch.Generator().manual_seed(seed))


def reference_objective(q, p_g, specialist_probs, specialties, active):
    """The objective by direct indexing (no collapse matrices): a check independent of the module."""
    def kl(p, r):
        return torch.where(p > 0, p * (p.log() - r.log()), torch.zeros_like(p)).sum(dim=1)

    value = kl(p_g, q)
    for m, (p_m, s) in enumerate(zip(specialist_probs, specialties)):
        others = [c for c in range(s.num_classes) if c not in s.classes]
        collapsed = torch.cat([q[:, list(s.classes)], q[:, others].sum(dim=1, keepdim=True)], dim=1)
        value = value + active[:, m].to(q.dtype) * kl(p_m, collapsed)
    return value


# ---------------------------------------------------------------- clusters


def test_covariance_by_hand_two_classes():
    probs = torch.tensor([[0.8, 0.2], [0.4, 0.6], [0.6, 0.4]])
    # Column 0: mean 0.6, deviations (0.2, -0.2, 0) -> variance 0.08 / 2; column 1 = 1 - column 0.
    expected = torch.tensor([[0.04, -0.04], [-0.04, 0.04]], dtype=torch.float64)
    cov = prediction_covariance(probs)
    assert cov.dtype == torch.float64
    torch.testing.assert_close(cov, expected, atol=1e-7, rtol=0)


def test_covariance_matches_numpy():
    probs = random_probs(50, 6, seed=1)
    np.testing.assert_allclose(prediction_covariance(probs).numpy(), np.cov(probs.numpy(), rowvar=False), atol=1e-12)


def planted_predictions(n=3000, seed=0):
    """A generalist's predictions on 10 classes: {0,1,2} confused together, {5,6} likewise, the rest confident."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 10, (n,), generator=g)
    probs = 0.1 * flat_dirichlet(n, 10, g)
    probs[torch.arange(n), labels] += 0.9
    for group in ([0, 1, 2], [5, 6]):
        rows = torch.isin(labels, torch.tensor(group)).nonzero().flatten()
        shared = flat_dirichlet(len(rows), len(group), g)
        block = torch.zeros(len(rows), 10, dtype=torch.float64)
        block[:, group] = shared
        probs[rows] = 0.98 * block + 0.02 / 10
    return probs


def test_cluster_classes_finds_planted_confusable_groups():
    probs = planted_predictions()
    # 7 clusters: the two planted groups and the five confident classes on their own.
    assert cluster_classes(probs, k=7) == [[0, 1, 2], [5, 6]]


def test_cluster_classes_min_size_controls_singletons():
    probs = planted_predictions()
    everything = cluster_classes(probs, k=7, min_size=1)
    assert everything == [[0, 1, 2], [3], [4], [5, 6], [7], [8], [9]]
    assert cluster_classes(probs, k=7, min_size=3) == [[0, 1, 2]]
    assert cluster_classes(probs, k=1, min_size=1) == [list(range(10))]


@pytest.mark.parametrize("seed", [0, 1])
def test_cluster_classes_is_kmeans_on_correlation_columns(seed):
    from sklearn.cluster import KMeans

    probs = random_probs(40, 8, seed=seed)
    points = np.corrcoef(probs.numpy(), rowvar=False)
    assignment = KMeans(n_clusters=3, n_init=10, random_state=seed).fit_predict(points)
    expected = sorted(([c for c in range(8) if assignment[c] == a] for a in set(assignment)), key=lambda c: c[0])
    assert cluster_classes(probs, k=3, min_size=1, seed=seed) == expected


def test_cluster_classes_returns_python_ints():
    clusters = cluster_classes(planted_predictions(), k=7)
    assert all(type(c) is int for cluster in clusters for c in cluster)


@pytest.mark.parametrize("k", [0, -1, 11])
def test_cluster_classes_rejects_bad_k(k):
    with pytest.raises(ValueError, match=r"k must be between 1 and the number of classes \(10\), got"):
        cluster_classes(random_probs(20, 10, seed=0), k=k)


def test_cluster_classes_rejects_bad_min_size():
    with pytest.raises(ValueError, match="min_size must be at least 1, got 0"):
        cluster_classes(random_probs(20, 10, seed=0), k=2, min_size=0)


# ---------------------------------------------------------------- dustbin


def test_specialty_sorts_classes_and_counts_outputs():
    s = Specialty((4, 1), num_classes=6)
    assert s.classes == (1, 4)
    assert s.dustbin == 2
    assert s.n_outputs == 3
    with pytest.raises(FrozenInstanceError):
        s.num_classes = 7


def test_to_local_by_hand():
    s = Specialty((4, 1), num_classes=6)
    labels = torch.tensor([0, 1, 2, 3, 4, 5, 4])
    local = s.to_local(labels)
    assert local.dtype == torch.long
    assert local.tolist() == [2, 0, 2, 2, 1, 2, 1]


def test_collapse_matrix_by_hand():
    s = Specialty((1, 3), num_classes=5)
    expected = torch.tensor([[0, 0, 1], [1, 0, 0], [0, 0, 1], [0, 1, 0], [0, 0, 1]], dtype=torch.float32)
    assert torch.equal(s.collapse_matrix(), expected)
    assert s.collapse_matrix(dtype=torch.float64).dtype == torch.float64
    q = torch.tensor([[0.1, 0.2, 0.3, 0.15, 0.25]])
    torch.testing.assert_close(q @ s.collapse_matrix(), torch.tensor([[0.2, 0.15, 0.65]]))


def labels_with(own, others, own_classes=(1, 3), other_classes=(0, 2, 4), seed=0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.cat([
        torch.tensor(own_classes)[torch.randint(0, len(own_classes), (own,), generator=g)],
        torch.tensor(other_classes)[torch.randint(0, len(other_classes), (others,), generator=g)],
    ])
    return labels[torch.randperm(len(labels), generator=g)]


def test_training_rows_half_own_half_others():
    s = Specialty((1, 3), num_classes=5)
    labels = labels_with(own=30, others=100)
    rows, shift = s.training_rows(labels, torch.Generator().manual_seed(0))
    assert rows.dtype == torch.long
    assert len(rows) == 60 and len(set(rows.tolist())) == 60
    assert torch.equal(rows, rows.sort().values)
    own_rows = [i for i, y in enumerate(labels.tolist()) if y in (1, 3)]
    assert set(own_rows) <= set(rows.tolist())
    assert sum(labels[rows].tolist().count(c) for c in (0, 2, 4)) == 30
    assert shift == pytest.approx(math.log(100 / 30))


def test_training_rows_deterministic_under_a_seed():
    s = Specialty((1, 3), num_classes=5)
    labels = labels_with(own=30, others=100)
    first, _ = s.training_rows(labels, torch.Generator().manual_seed(7))
    again, _ = s.training_rows(labels, torch.Generator().manual_seed(7))
    other, _ = s.training_rows(labels, torch.Generator().manual_seed(8))
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


def test_training_rows_takes_all_the_rest_when_fewer():
    s = Specialty((1, 3), num_classes=5)
    labels = labels_with(own=30, others=10)
    rows, shift = s.training_rows(labels, torch.Generator().manual_seed(0))
    assert rows.tolist() == list(range(40))
    assert shift == 0.0


def test_training_rows_needs_an_example_of_the_specialty():
    s = Specialty((1, 3), num_classes=5)
    with pytest.raises(ValueError, match=r"no example has a label in the specialist's classes \(1, 3\)"):
        s.training_rows(torch.tensor([0, 2, 4, 4]), torch.Generator().manual_seed(0))


@pytest.mark.parametrize(
    "classes, message",
    [
        ((), "a specialty needs at least one class"),
        ((1, 1), r"specialist classes must be unique, got \(1, 1\)"),
        ((-1, 2), r"specialist classes must lie in \[0, 5\), got \(-1, 2\)"),
        ((2, 5), r"specialist classes must lie in \[0, 5\), got \(2, 5\)"),
        ((0, 1, 2, 3, 4), "a specialty covering all 5 classes has no dustbin"),
    ],
)
def test_bad_specialty_raises(classes, message):
    with pytest.raises(ValueError, match=message):
        Specialty(classes, num_classes=5)


# ---------------------------------------------------------------- combine: which specialists


def test_active_specialists_by_hand():
    specialties = [Specialty((0, 1), 5), Specialty((1, 2), 5), Specialty((3,), 5)]
    p_g = torch.tensor([
        [0.50, 0.30, 0.10, 0.05, 0.05],  # top-1 {0}, top-2 {0, 1}
        [0.10, 0.10, 0.05, 0.60, 0.15],  # top-1 {3}, top-2 {3, 4}
        [0.05, 0.05, 0.30, 0.10, 0.50],  # top-1 {4}, top-2 {4, 2}
    ])
    assert active_specialists(p_g, specialties).tolist() == [
        [True, False, False], [False, False, True], [False, False, False]]
    assert active_specialists(p_g, specialties, top_n=2).tolist() == [
        [True, True, False], [False, False, True], [False, True, False]]


def test_active_specialists_rejects_bad_top_n():
    with pytest.raises(ValueError, match=r"top_n must be between 1 and the number of classes \(5\), got 0"):
        active_specialists(torch.full((2, 5), 0.2), [Specialty((0,), 5)], top_n=0)


# ---------------------------------------------------------------- combine: the optimum


def overlapping_setup(batch=6, seed=0):
    """A small batch, 7 classes, three overlapping specialists, a mix of active flags."""
    specialties = [Specialty((0, 1, 2), 7), Specialty((2, 3), 7), Specialty((1, 4, 5), 7)]
    p_g = random_probs(batch, 7, seed=seed)
    specialist_probs = [random_probs(batch, s.n_outputs, seed=seed + 1 + m) for m, s in enumerate(specialties)]
    g = torch.Generator().manual_seed(seed + 10)
    active = torch.rand(batch, 3, generator=g) < 0.7
    active[0] = True  # every specialist at once
    active[1] = False  # none
    return p_g, specialist_probs, specialties, active


def test_objective_matches_direct_indexing():
    p_g, sp, specialties, active = overlapping_setup()
    q = random_probs(len(p_g), 7, seed=99)
    value = objective(q, p_g, sp, specialties, active)
    assert value.dtype == torch.float64 and value.shape == (len(p_g),)
    torch.testing.assert_close(value, reference_objective(q, p_g, sp, specialties, active), atol=1e-12, rtol=0)


def test_no_active_specialist_gives_the_generalist():
    p_g, sp, specialties, active = overlapping_setup()
    p_g = p_g.float()
    q = combine(p_g, sp, specialties, torch.zeros_like(active))
    torch.testing.assert_close(q, p_g, atol=1e-6, rtol=0)


def test_uniform_generalist_one_specialist_exact_optimum():
    # Stationarity: 2 q = u + r(q). A specialist class c is alone in its output, so r_c = p_m[c] and
    # q_c = (1/C + p_m[c]) / 2; summing over the dustbin group D gives q(D) = (|D|/C + p_m[dustbin]) / 2,
    # shared uniformly since every q_c in D solves the same equation.
    C, s = 8, Specialty((2, 5, 6), 8)
    u = torch.full((4, C), 1 / C)
    p_m = random_probs(4, s.n_outputs, seed=3).float()
    q = combine(u, [p_m], [s], torch.ones(4, 1, dtype=torch.bool))
    A = s.collapse_matrix()
    torch.testing.assert_close(q @ A, (u @ A + p_m) / 2, atol=1e-5, rtol=0)
    torch.testing.assert_close(q[:, [2, 5, 6]], (1 / C + p_m[:, :3]) / 2, atol=1e-5, rtol=0)
    dust = q[:, [0, 1, 3, 4, 7]]
    torch.testing.assert_close(dust, ((5 / C + p_m[:, 3:]) / 2 / 5).expand_as(dust), atol=1e-5, rtol=0)


def test_one_specialist_exact_optimum_for_any_generalist_even_a_zero_class():
    # Same stationarity with any p_g: q_c = (p_g[c] + p_m[c]) / 2 on the specialist's classes; on D,
    # q_c (2 - p_m[dustbin] / q(D)) = p_g[c], so q stays proportional to p_g with q(D) = (p_g(D) + p_m[dustbin]) / 2.
    s = Specialty((0, 3), 6)
    p_g = random_probs(5, 6, seed=4)
    p_g[:, 0] = 0  # the generalist rules class 0 out; the specialist must still be able to put mass there
    p_g = p_g / p_g.sum(dim=1, keepdim=True)
    p_m = random_probs(5, 3, seed=5)
    q = combine(p_g, [p_m], [s], torch.ones(5, 1, dtype=torch.bool))
    torch.testing.assert_close(q[:, [0, 3]], (p_g[:, [0, 3]] + p_m[:, :2]) / 2, atol=1e-7, rtol=0)
    dust = [1, 2, 4, 5]
    dust_mass = p_g[:, dust].sum(dim=1, keepdim=True)
    expected = p_g[:, dust] * (dust_mass + p_m[:, 2:]) / (2 * dust_mass)
    torch.testing.assert_close(q[:, dust], expected, atol=1e-7, rtol=0)
    assert (q[:, 0] > 0.01).all()


@pytest.mark.parametrize("copies", [1, 3, 9])
def test_identical_specialists_pull_towards_their_distribution(copies):
    # (1 + m) q = u + m r(q): per output, q @ A = (u @ A + m p) / (m + 1).
    C, s = 6, Specialty((1, 4), 6)
    u = torch.full((3, C), 1 / C, dtype=torch.float64)
    p = random_probs(3, s.n_outputs, seed=6)
    q = combine(u, [p] * copies, [s] * copies, torch.ones(3, copies, dtype=torch.bool))
    A = s.collapse_matrix(dtype=torch.float64)
    expected = (u @ A + copies * p) / (copies + 1)
    torch.testing.assert_close(q @ A, expected, atol=1e-5, rtol=0)


def test_fixed_point_beats_random_perturbations_in_the_simplex():
    p_g, sp, specialties, active = overlapping_setup(batch=8, seed=1)
    q = combine(p_g, sp, specialties, active)
    best = objective(q, p_g, sp, specialties, active)
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        direction = flat_dirichlet(*p_g.shape, g)
        step = 10 ** (-3 * torch.rand((len(p_g), 1), generator=g, dtype=torch.float64))  # 1e-3 .. 1
        mixed = (1 - step) * q + step * direction
        tilted = q * torch.exp(1e-2 * torch.randn(q.shape, generator=g, dtype=torch.float64))
        tilted = tilted / tilted.sum(dim=1, keepdim=True)
        for other in (mixed, tilted):
            assert (objective(other, p_g, sp, specialties, active) >= best - 1e-12).all()


def test_fixed_point_improves_on_the_generalist_when_a_specialist_disagrees():
    p_g, sp, specialties, active = overlapping_setup(batch=8, seed=2)
    q = combine(p_g, sp, specialties, active)
    gain = objective(p_g, p_g, sp, specialties, active) - objective(q, p_g, sp, specialties, active)
    some_active = active.any(dim=1)
    assert (gain[some_active] > 1e-4).all()
    assert gain[~some_active].abs().max() < 1e-9


def test_objective_never_increases_across_iterations():
    p_g, sp, specialties, active = overlapping_setup(batch=8, seed=3)
    values = torch.stack([
        objective(combine(p_g, sp, specialties, active, max_iter=k, tol=0), p_g, sp, specialties, active)
        for k in range(0, 40)
    ])
    steps = values[1:] - values[:-1]
    assert (steps <= 1e-12).all()
    assert (values[-1] < values[0] - 1e-4)[active.any(dim=1)].all()


def test_matches_gradient_descent_on_logits():
    p_g, sp, specialties, active = overlapping_setup(batch=6, seed=4)
    logits = p_g.log().clone().requires_grad_(True)
    optimiser = torch.optim.LBFGS(
        [logits], lr=1, max_iter=2000, tolerance_grad=1e-14, tolerance_change=1e-16, history_size=50,
        line_search_fn="strong_wolfe")

    def closure():
        optimiser.zero_grad()
        loss = reference_objective(torch.softmax(logits, dim=1), p_g, sp, specialties, active).sum()
        loss.backward()
        return loss

    for _ in range(5):
        optimiser.step(closure)
    by_descent = torch.softmax(logits.detach(), dim=1)
    torch.testing.assert_close(combine(p_g, sp, specialties, active), by_descent, atol=1e-5, rtol=0)


def test_output_shape_dtype_and_normalisation_on_a_large_batch():
    B, C = 10000, 10
    specialties = [Specialty((0, 1, 2), C), Specialty((2, 3, 4, 5), C), Specialty((6, 7), C)]
    p_g = random_probs(B, C, seed=7).float()
    sp = [random_probs(B, s.n_outputs, seed=8 + m).float() for m, s in enumerate(specialties)]
    active = active_specialists(p_g, specialties, top_n=2)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # on a busy machine, threads fighting over cores make timings erratic
    try:
        start = time.perf_counter()
        q = combine(p_g, sp, specialties, active)
        elapsed = time.perf_counter() - start
    finally:
        torch.set_num_threads(threads)
    assert q.shape == (B, C) and q.dtype == torch.float32
    assert not q.isnan().any() and (q >= 0).all()
    torch.testing.assert_close(q.sum(dim=1), torch.ones(B), atol=1e-5, rtol=0)
    # About 0.1 s vectorised; a Python loop over the examples would take minutes.
    assert elapsed < 10


def test_combine_rejects_mismatched_inputs():
    p_g, sp, specialties, active = overlapping_setup()
    with pytest.raises(ValueError, match="got 2 specialist predictions, 3 specialties and 3 columns of active"):
        combine(p_g, sp[:2], specialties, active)
    with pytest.raises(ValueError, match=r"specialist 1 predictions have shape \(6, 4\), expected \(6, 3\)"):
        combine(p_g, [sp[0], sp[2], sp[2]], specialties, active)
    with pytest.raises(ValueError, match="specialty 0 is for 5 classes, the generalist has 7"):
        combine(p_g, [sp[0][:, :3]], [Specialty((0, 1), 5)], active[:, :1])


def test_unsure_classes_that_are_not_confused_stay_apart():
    """Classes 0-3 are predicted less surely than 4-7, but only 0 and 1 are confused with each other
    (2 and 3 spread their doubt over every class). Raw covariance columns differ mostly by that
    sureness and lump 0-3 together; the correlation columns give the confused pair a cluster of its own."""
    g = torch.Generator().manual_seed(0)
    n = 8000
    labels = torch.arange(n) % 8
    sure = torch.where(labels < 4, 0.55, 0.99) + 0.02 * torch.rand(n, generator=g)
    sure = sure.clamp(max=0.999)
    probs = torch.zeros(n, 8)
    probs[torch.arange(n), labels] = sure
    pair = labels < 2
    probs[torch.arange(n)[pair], 1 - labels[pair]] = 1 - sure[pair]
    doubt = (1 - sure[~pair])[:, None] / 7 * (1 - torch.nn.functional.one_hot(labels[~pair], 8).float())
    probs[~pair] += doubt
    assert [0, 1] in cluster_classes(probs, k=5, min_size=2)
