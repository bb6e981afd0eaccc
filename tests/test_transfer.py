"""Transfer sets (`transfer.*`), bias correction, the unlabeled loss and the online teacher."""

import pytest
import torch
from omegaconf import OmegaConf

from kdrun.bias import apply_shift, errors, shift_logits, tune_shift
from kdrun.data.batches import DeviceData
from kdrun.data.transfer import affected_classes, describe, select_rows
from kdrun.errors import KdrunError
from kdrun.losses import hinton_loss, kd_kl
from kdrun.models.mlp import MLP
from kdrun.objectives import HintonKD, OnlineTeacher
from kdrun.schedules import Constant

LABELS = torch.arange(2000) % 10  # 200 of each class


def transfer(**kw):
    base = {"exclude_classes": [], "only_classes": [], "fraction": 1.0, "labels": True, "augment": False,
            "val_size": 0, "bias_correction": False}
    return OmegaConf.create({**base, **kw})


def test_default_transfer_set_is_the_whole_split():
    rows = select_rows(LABELS, transfer(), seed=0)
    assert torch.equal(rows.train, torch.arange(2000)) and rows.val.numel() == 0
    assert describe(transfer()) is None


def test_exclude_classes_drops_exactly_those_classes_and_the_validation_split():
    rows = select_rows(LABELS, transfer(exclude_classes=[3], val_size=500), seed=0)
    assert rows.val.numel() == 500 and torch.bincount(LABELS[rows.val]).tolist() == [50] * 10  # stratified
    expected = set(range(2000)) - set(rows.val.tolist()) - set(torch.nonzero(LABELS == 3).squeeze(1).tolist())
    assert set(rows.train.tolist()) == expected and rows.train.numel() == len(expected) == 1500 - 150
    assert affected_classes(transfer(exclude_classes=[3])) == [3]
    assert describe(transfer(exclude_classes=[3])) == "without 3"


def test_only_classes_keeps_exactly_those_classes():
    rows = select_rows(LABELS, transfer(only_classes=[8, 7]), seed=0)
    assert set(rows.train.tolist()) == set(torch.nonzero((LABELS == 7) | (LABELS == 8)).squeeze(1).tolist())
    assert affected_classes(transfer(only_classes=[8, 7])) == [7, 8]


def test_fraction_is_stratified_deterministic_and_seeded():
    rows = select_rows(LABELS, transfer(fraction=0.03), seed=0)
    assert rows.train.numel() == 60 and torch.bincount(LABELS[rows.train]).tolist() == [6] * 10
    assert torch.equal(rows.train, select_rows(LABELS, transfer(fraction=0.03), seed=0).train)
    assert not torch.equal(rows.train, select_rows(LABELS, transfer(fraction=0.03), seed=1).train)
    assert describe(transfer(fraction=0.03)) == "3%"


def test_fraction_and_validation_keep_class_shares_of_an_unbalanced_split():
    labels = torch.cat([torch.full((n,), c) for c, n in enumerate((1000, 500, 300, 200))])  # 2000 rows
    rows = select_rows(labels, transfer(val_size=200, fraction=0.5), seed=3)
    assert torch.bincount(labels[rows.val]).tolist() == [100, 50, 30, 20]
    assert torch.bincount(labels[rows.train]).tolist() == [450, 225, 135, 90]
    assert not set(rows.train.tolist()) & set(rows.val.tolist())
    assert describe(transfer(fraction=0.025)) == "2.5%" and describe(transfer(only_classes=[8, 7])) == "only 7, 8"


def test_an_empty_transfer_set_is_refused():
    with pytest.raises(KdrunError, match="the transfer set is empty: only 7 leaves no training examples"):
        select_rows(torch.zeros(50, dtype=torch.long), transfer(only_classes=[7]), seed=0)


def test_cached_logits_pair_with_the_rows_of_a_transfer_subset():
    from kdrun.loop import predict
    from kdrun.objectives import CachedLogits

    g = torch.Generator().manual_seed(0)
    data = DeviceData(torch.randint(0, 256, (200, 1, 4, 4), generator=g, dtype=torch.uint8), torch.arange(200) % 10,
                      0.5, 0.5, "cpu")
    teacher = MLP([1, 4, 4], 10, [8]).eval()
    cache = CachedLogits(predict(teacher, data, batch_size=7))  # over the whole split, as the cache is
    rows = select_rows(data.labels, transfer(exclude_classes=[3], fraction=0.5, val_size=20), seed=0)
    subset = data.subset(rows.train)
    seen = 0
    with torch.no_grad():
        for batch in subset.batches(16, shuffle=True, generator=torch.Generator().manual_seed(1)):
            assert torch.allclose(cache(batch), teacher(batch.x), atol=1e-5)
            assert not (batch.y == 3).any()
            seen += batch.y.numel()
    assert seen == len(subset) == rows.train.numel()


def test_subset_batches_keep_whole_split_indices_and_can_hide_labels():
    images = torch.arange(20, dtype=torch.uint8).view(20, 1, 1, 1).expand(20, 1, 2, 2).contiguous()
    data = DeviceData(images, torch.arange(20) % 4, 0.0, 1.0, "cpu")
    rows = torch.tensor([3, 7, 11, 19])
    sub = data.subset(rows)
    batch = next(sub.batches(4, shuffle=True, generator=torch.Generator().manual_seed(0)))
    assert sorted(batch.idx.tolist()) == [3, 7, 11, 19]
    assert torch.equal(batch.x[:, 0, 0, 0], batch.idx.float() / 255)  # each row's image came with its index
    assert torch.equal(batch.y, data.labels[batch.idx])
    nested = sub.subset(torch.tensor([1, 2]), labelled=False)
    batch = next(nested.batches(2))
    assert batch.idx.tolist() == [7, 11] and batch.y is None


def test_bias_search_recovers_a_planted_shift():
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 10, (3000,), generator=g)
    clean = torch.randn(3000, 10, generator=g) + 4 * torch.nn.functional.one_hot(labels, 10)
    planted = shift_logits(clean, [3], -6.0)  # class 3's bias far too low, as after a transfer set with no 3s
    assert errors(planted, labels) > errors(clean, labels) + 200
    shift, after = tune_shift(planted, labels, [3])
    assert shift == pytest.approx(6.0, abs=1.0)
    assert after <= errors(clean, labels) + 10
    # and for a group raised together (the paper's 7s and 8s), the search lowers them
    shift, _ = tune_shift(shift_logits(clean, [7, 8], 5.0), labels, [7, 8])
    assert shift == pytest.approx(-5.0, abs=1.0)


def test_bias_search_takes_the_middle_of_equally_good_shifts():
    labels = torch.tensor([0, 3])
    logits = torch.tensor([[5.0, 0, 0, 0], [0, 0, 0, -4.0]])  # any shift of class 3 in (4, 5] is perfect
    shift, after = tune_shift(logits, labels, [3])
    assert after == 0 and shift == pytest.approx(4.5, abs=0.1)  # not 4.1, the edge nearest 0


def test_bias_search_does_not_shift_without_evidence():
    labels = torch.tensor([0, 1, 2])
    logits = torch.nn.functional.one_hot(labels, 10).float() * 100
    assert tune_shift(logits, labels, [5]) == (0.0, 0)


def test_apply_shift_moves_the_output_bias_of_those_classes_only():
    model = MLP([1, 2, 2], 10, [3])
    x = torch.randn(4, 1, 2, 2)
    before = model(x)
    apply_shift(model, [2, 5], 1.5)
    assert torch.allclose(model(x), shift_logits(before, [2, 5], 1.5), atol=1e-6)


def test_unlabeled_loss_is_the_scaled_soft_term_and_needs_alpha_1():
    s, t = torch.randn(8, 10), torch.randn(8, 10)
    loss, parts = hinton_loss(s, t, None, 4.0, 1.0)
    assert torch.allclose(loss, 16 * kd_kl(s, t, 4.0)) and "ce" not in parts
    with pytest.raises(ValueError, match="alpha=0.9 needs labels"):
        hinton_loss(s, t, None, 4.0, 0.9)


class Recording(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.seen = []
        self.lin = torch.nn.Linear(4, 10)

    def forward(self, x):
        self.seen.append(x.clone())
        return self.lin(x.flatten(1))


def test_online_teacher_sees_the_very_jittered_batch_the_student_sees():
    images = (torch.rand(16, 1, 2, 2) * 255).to(torch.uint8)
    data = DeviceData(images, torch.arange(16) % 10, 0.5, 0.25, "cpu")
    teacher, student = Recording(), Recording()
    objective = HintonKD(Constant(4.0), Constant(0.9), teacher=OnlineTeacher(teacher))
    for batch in data.batches(8, shuffle=True, generator=torch.Generator().manual_seed(0), jitter=1):
        objective(student, batch, 0.0)
    assert len(teacher.seen) == len(student.seen) == 2
    assert all(torch.equal(a, b) for a, b in zip(teacher.seen, student.seen))
    assert not teacher.training  # dropout off in the teacher
