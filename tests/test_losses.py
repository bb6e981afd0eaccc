"""Properties of the distillation losses (docs/loss.md; Hinton, Vinyals & Dean 2015, section 2)."""

import pytest
import torch
import torch.nn.functional as F

from kdrun.losses import hinton_loss, kd_kl, logit_matching, softmax_t



pytestmark = pytest.mark.usefixtures("float64")  # conftest: float64 by default


def logits(b=16, n=10, seed=0, scale=3.0):
    return torch.randn(b, n, generator=torch.Generator().manual_seed(seed)) * scale


def zero_mean(z):
    return z - z.mean(dim=1, keepdim=True)


def test_softmax_t_is_softmax_of_scaled_logits_and_softens():
    z = logits()
    assert torch.allclose(softmax_t(z, 1.0), F.softmax(z, dim=1))
    assert torch.allclose(softmax_t(z, 4.0), F.softmax(z / 4.0, dim=1))
    entropy = lambda p: -(p * p.log()).sum(1)  # noqa: E731
    assert (entropy(softmax_t(z, 5.0)) > entropy(softmax_t(z, 1.0))).all()


@pytest.mark.parametrize("T", [1.0, 2.0, 5.0, 20.0])
def test_kl_is_non_negative_and_zero_only_when_equal(T):
    for seed in range(20):
        z, v = logits(seed=seed), logits(seed=seed + 100)
        assert kd_kl(z, v, T) > 0
        assert kd_kl(z, z, T).abs() < 1e-12
        assert kd_kl(v + 7.0, v, T).abs() < 1e-12  # a constant shift of logits is the same distribution


def test_kl_reduction_is_batchmean():
    z, v, T = logits(), logits(seed=1), 3.0
    p, log_p, log_q = softmax_t(v, T), F.log_softmax(v / T, 1), F.log_softmax(z / T, 1)
    per_example = (p * (log_p - log_q)).sum(dim=1)
    assert torch.allclose(kd_kl(z, v, T), per_example.mean())
    # doubling the batch with copies does not change a batchmean
    assert torch.allclose(kd_kl(torch.cat([z, z]), torch.cat([v, v]), T), kd_kl(z, v, T))


@pytest.mark.parametrize("T", [1.0, 3.0, 10.0])
def test_soft_gradient_is_q_minus_p_over_T(T):
    z, v = logits().requires_grad_(), logits(seed=1)
    kd_kl(z, v, T).backward()
    expected = (softmax_t(z.detach(), T) - softmax_t(v, T)) / T / z.shape[0]
    assert torch.allclose(z.grad, expected, atol=1e-12)


@pytest.mark.parametrize("T", [10.0, 20.0])
def test_high_temperature_limit_is_logit_matching(T):
    """For zero-meaned logits, d(KL)/dz ~= (z - v) / (N T^2) per example, so T^2 * KL has gradient
    (z - v) / N (then / B for the batchmean) whatever T is: the scaled loss is T-independent."""
    b, n = 16, 10
    z, v = zero_mean(logits(b, n, 0, scale=0.5)).requires_grad_(), zero_mean(logits(b, n, 1, scale=0.5))
    (T * T * kd_kl(z, v, T)).backward()
    limit = (z.detach() - v) / n / b
    rel = (z.grad - limit).norm() / limit.norm()
    assert rel < 0.6 / T  # the error falls like 1/T
    z2 = z.detach().clone().requires_grad_()
    kd_kl(z2, v, T).backward()
    assert torch.allclose(z2.grad * T * T, z.grad)  # unscaled gradient is 1/T^2 of the scaled one
    # and the value of T^2 * KL approaches logit matching, 1/(2N) sum (z - v)^2
    assert (T * T * kd_kl(z.detach(), v, T) - logit_matching(z.detach(), v)).abs() < 0.6 / T * logit_matching(z.detach(), v)


def test_scaled_gradients_agree_at_T10_and_T20():
    z, v = zero_mean(logits(scale=0.5)), zero_mean(logits(seed=1, scale=0.5))
    grads = []
    for T in (10.0, 20.0):
        zz = z.clone().requires_grad_()
        (T * T * kd_kl(zz, v, T)).backward()
        grads.append(zz.grad)
    assert torch.allclose(grads[0], grads[1], rtol=0.05, atol=1e-4)
    unscaled = []
    for T in (10.0, 20.0):
        zz = z.clone().requires_grad_()
        kd_kl(zz, v, T).backward()
        unscaled.append(zz.grad)
    assert torch.allclose(unscaled[0], 4 * unscaled[1], rtol=0.05, atol=1e-6)  # (20/10)^2 without the T^2


def test_hinton_loss_combines_terms_with_alpha_on_the_soft_term():
    z, v, y, T, alpha = logits(), logits(seed=1), torch.arange(16) % 10, 4.0, 0.3
    total, parts = hinton_loss(z, v, y, T, alpha)
    soft, hard = kd_kl(z, v, T), F.cross_entropy(z, y)
    assert torch.allclose(total, alpha * T * T * soft + (1 - alpha) * hard)
    assert torch.allclose(parts["kd_unscaled"], soft)
    assert torch.allclose(parts["kd_scaled"], T * T * soft)
    assert torch.allclose(parts["ce"], hard)


def test_alpha_zero_is_cross_entropy_and_ignores_the_teacher():
    z, y = logits(), torch.arange(16) % 10
    a, parts = hinton_loss(z, logits(seed=1), y, 4.0, 0.0)
    b, _ = hinton_loss(z, logits(seed=2) * 100, y, 4.0, 0.0)
    c, alone = hinton_loss(z, None, y, 4.0, 0.0)
    assert torch.allclose(a, F.cross_entropy(z, y)) and torch.allclose(a, b) and torch.allclose(a, c)
    assert set(parts) == {"ce", "kd_scaled", "kd_unscaled"} and set(alone) == {"ce"}
    with pytest.raises(ValueError, match="needs teacher logits"):
        hinton_loss(z, None, y, 4.0, 0.5)


def test_alpha_one_ignores_the_labels():
    z, v = logits(), logits(seed=1)
    a, parts = hinton_loss(z, v, torch.zeros(16, dtype=torch.long), 4.0, 1.0)
    b, _ = hinton_loss(z, v, torch.arange(16) % 10, 4.0, 1.0)
    assert torch.allclose(a, b) and torch.allclose(a, 16 * kd_kl(z, v, 4.0))
    assert torch.allclose(parts["ce"], F.cross_entropy(z, torch.zeros(16, dtype=torch.long)))  # logged only


def test_logit_matching_ignores_per_example_shifts():
    z, v = logits(), logits(seed=1)
    assert torch.allclose(logit_matching(z + 5.0, v - 2.0), logit_matching(z, v))
    assert logit_matching(z, z) == 0
