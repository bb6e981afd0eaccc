"""CRD: the memory banks' update, the NCE loss and its normalisation constant by hand on tiny banks, the
negatives' draw, what the objective declares and owns, the memory refusal, and the method end to end
from the CLI, resumed bit-identically (weights and banks) after a SIGKILL."""

import json
import math
import re

import pytest
import torch
import torch.nn.functional as F

from conftest import CNN_TEACHER, FEATURE_SUBSET, use_teachers
from kill_resume import assert_resumed_identically, kill_and_resume, only_run
from kdrun.training import attach_objective
from kdrun.data.batches import Batch
from kdrun.errors import KdrunError
from kdrun.models import LeNet5, SmallCNN
from kdrun.models.features import FeatureTap
from kdrun.objectives import FitNet, OnlineTeacher
from kdrun.objectives.base import Needs, needs_of
from kdrun.objectives.crd import CRD, bank_init, check_memory, contrast_scores, draw_negatives, nce_loss, update_bank
from kdrun.schedules import Constant

# ---------------------------------------------------------------- the pure parts by hand


def test_the_bank_update_mixes_by_momentum_and_renormalises_only_the_batchs_rows():
    bank = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    update_bank(bank, torch.tensor([2, 0]), torch.tensor([[0.0, 1.0], [0.0, 1.0]]), 0.75)
    # row 2: 0.75 * [0.6, 0.8] + 0.25 * [0, 1] = [0.45, 0.85]; row 0: [0.75, 0.25]; each then over its norm
    assert bank[2].tolist() == pytest.approx([0.45 / math.hypot(0.45, 0.85), 0.85 / math.hypot(0.45, 0.85)])
    assert bank[0].tolist() == pytest.approx([0.75 / math.hypot(0.75, 0.25), 0.25 / math.hypot(0.75, 0.25)])
    assert bank[1].tolist() == [0.0, 1.0]


def test_nce_loss_by_hand():
    p = torch.tensor([[0.5, 0.25, 1.0], [2.0, 0.0, 0.5]])  # 2 negatives, 4 rows: K / N = 0.5
    eps = 1e-7
    expected = -(math.log(0.5 / (1.0 + eps)) + math.log(0.5 / (0.75 + eps)) + math.log(0.5 / (1.5 + eps))
                 + math.log(2.0 / (2.5 + eps)) + math.log(0.5 / (0.5 + eps)) + math.log(0.5 / (1.0 + eps))) / 2
    assert nce_loss(p, 4).item() == pytest.approx(expected, rel=1e-6)
    # eps matters where K / N is of its order: a negative scored 0 against 1e-7 noise gives log(1/2), not 0
    one = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    assert nce_loss(one, 10_000_000).item() == pytest.approx(math.log(2) + 2e-7, rel=1e-6)


def test_contrast_scores_are_exp_of_the_dot_products_over_tau():
    bank = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    anchors = torch.tensor([[0.6, 0.8]])
    out = contrast_scores(bank, anchors, torch.tensor([[2, 0, 1]]), 0.5)
    assert out[0].tolist() == pytest.approx([math.exp(1.0 / 0.5), math.exp(0.6 / 0.5), math.exp(0.8 / 0.5)])


def test_negatives_are_uniform_over_the_other_rows_and_never_the_own_row():
    g = torch.Generator().manual_seed(0)
    rows = torch.tensor([0, 1, 2, 3, 4])
    neg = draw_negatives(rows, 5, 4000, g)
    assert neg.shape == (5, 4000) and neg.min() >= 0 and neg.max() <= 4
    assert not (neg == rows[:, None]).any()
    for r in range(5):
        counts = torch.bincount(neg[r], minlength=5).float()
        others = counts[torch.arange(5) != r]
        assert counts[r] == 0 and (others / 4000 - 0.25).abs().max() < 0.03  # each other row about 1/4


def test_the_banks_start_uniform_in_the_codes_interval():
    bank = bank_init(2000, 12, torch.Generator().manual_seed(0))
    a = 1 / math.sqrt(12 / 3)
    assert bank.min() >= -a and bank.max() <= a and bank.min() < -0.95 * a and bank.max() > 0.95 * a


# ---------------------------------------------------------------- the objective


def crd_on(n_rows=6, **kw):
    torch.manual_seed(0)
    teacher, student = SmallCNN([1, 12, 12], 3).eval(), LeNet5([1, 12, 12], 3, channels=(2, 3), fc=(4,))
    objective = CRD(Constant(4.0), OnlineTeacher(teacher, None, FeatureTap(teacher, {})), feat_dim=4, **kw)
    groups = attach_objective({}, student, objective, (1, 12, 12), n_rows)
    return objective, student, teacher, groups


def test_crd_declares_a_teacher_penultimate_features_and_rows():
    node = {"_target_": "kdrun.objectives.crd.CRD", "ce_weight": 0}
    assert needs_of(node) == Needs(True, ("penultimate",), ("penultimate",), labels=False)
    assert CRD.uses_rows and not FitNet.uses_rows  # only CRD is given the train split's rows


def test_crd_owns_two_heads_and_two_banks_of_every_row_and_caps_k():
    objective, student, _, groups = crd_on(n_rows=6, lr=0.01)
    assert objective.k == 5 and objective.n_rows == 6  # nce_k 16384 capped at N - 1
    assert objective.bank_s.shape == objective.bank_t.shape == (6, 4)
    assert objective.embed_s.linear.in_features == 4 and objective.embed_t.linear.in_features == 256
    assert groups[0]["lr"] == 0.01 and {id(p) for p in groups[0]["params"]} == {id(p) for p in objective.parameters()}
    assert not any(p is q for p in student.parameters() for q in objective.parameters())
    assert {"bank_s", "bank_t", "z", "_extra_state"} <= set(objective.state_dict())


def test_crd_loss_by_hand_with_z_set_on_the_first_batch_and_kept():
    objective, student, teacher, _ = crd_on(n_rows=6, nce_k=3, nce_m=0.25, crd_weight=0.5, kd_weight=2.0)
    bank_s, bank_t = objective.bank_s.clone(), objective.bank_t.clone()
    generator = torch.Generator()
    generator.set_state(objective.generator.get_state())
    x, y, idx = torch.randn(2, 1, 12, 12), torch.tensor([0, 2]), torch.tensor([4, 1])
    logits, loss, logs = objective(student, Batch(x, y, idx), 0.0)
    # by hand: the same negatives, the scores against the banks as they were, Z = N * mean, then NCE
    candidates = torch.cat([idx[:, None], draw_negatives(idx, 6, 3, generator)], 1)
    s = F.normalize(objective.embed_s.linear(_penultimate(student, x)), dim=1)
    t = F.normalize(objective.embed_t.linear(_penultimate(teacher, x)), dim=1)
    out_s = torch.exp(torch.einsum("bkd,bd->bk", bank_t[candidates], s) / 0.07)
    out_t = torch.exp(torch.einsum("bkd,bd->bk", bank_s[candidates], t) / 0.07)
    z_s, z_t = out_s.mean() * 6, out_t.mean() * 6
    assert objective.z.tolist() == pytest.approx([z_s.item(), z_t.item()], rel=1e-5)
    crd_s, crd_t = nce_loss(out_s / z_s, 6), nce_loss(out_t / z_t, 6)
    kd = 16 * F.kl_div(F.log_softmax(logits / 4, -1), F.log_softmax(teacher(x) / 4, -1), reduction="batchmean",
                       log_target=True)
    expected = F.cross_entropy(logits, y) + 2.0 * kd + 0.5 * (crd_s + crd_t)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert logs["crd_student"].item() == pytest.approx(crd_s.item(), rel=1e-5)
    # the banks moved at the batch's rows only, towards its embeddings, and stay unit vectors there
    expected_s = F.normalize(0.25 * bank_s[idx] + 0.75 * s.detach(), dim=1)
    assert torch.allclose(objective.bank_s[idx], expected_s, atol=1e-6)
    keep = torch.tensor([0, 2, 3, 5])
    assert torch.equal(objective.bank_s[keep], bank_s[keep]) and torch.equal(objective.bank_t[keep], bank_t[keep])
    z = objective.z.clone()
    objective(student, Batch(x, y, idx), 0.5)
    assert torch.equal(objective.z, z)  # estimated once


def _penultimate(model, x):
    tap = FeatureTap(model, {})
    with tap.capture() as feats:
        model(x)
    return feats["penultimate"]


def test_crd_gradients_reach_the_student_and_both_heads_not_the_banks():
    objective, student, _, _ = crd_on(n_rows=8, nce_k=4)
    x, y = torch.randn(3, 1, 12, 12), torch.tensor([0, 1, 2])
    _, loss, _ = objective(student, Batch(x, y, torch.tensor([0, 5, 7])), 0.0)
    loss.backward()
    assert objective.embed_s.linear.weight.grad.abs().sum() > 0 and objective.embed_t.linear.weight.grad.abs().sum() > 0
    assert student.head.weight.grad is not None and not objective.bank_s.requires_grad


def test_the_negatives_generator_is_extra_state():
    a, *_ = crd_on()
    torch.randint(0, 5, (10,), generator=a.generator)
    b, *_ = crd_on(seed=7)
    b.load_state_dict(a.state_dict())
    assert torch.equal(a.generator.get_state(), b.generator.get_state()) and torch.equal(a.bank_s, b.bank_s)


def test_banks_over_the_memory_limit_are_one_line():
    message = ("loss=crd: the memory banks need 0.293 MiB (2 x 300 rows x 128 x 4 bytes), over 0.102 MiB "
               "(loss.max_memory_gb=0.0001); lower loss.feat_dim or raise loss.max_memory_gb")
    with pytest.raises(KdrunError, match=f"^{re.escape(message)}$"):
        check_memory(300, 128, torch.device("cpu"), 0.0001)
    assert check_memory(300, 128, torch.device("cpu"), 0.001) == 2 * 300 * 128 * 4


# ---------------------------------------------------------------- end to end, and exact resume

SUBSET, TEACHER = FEATURE_SUBSET, CNN_TEACHER


def distill_args(epochs=1, *extra):
    return ["distill", *TEACHER, "student=lenet5", "loss=crd", *SUBSET, f"epochs={epochs}", *extra]


@pytest.mark.slow
def test_crd_distils_from_the_cli_with_its_banks_in_the_checkpoint_only(kdrun, workdir, cnn_teachers):
    use_teachers(cnn_teachers, workdir)
    proc = kdrun(*distill_args())
    assert "loss=crd: two memory banks of 300 rows x 128, 0.293 MiB on cpu; 299 negatives an example" in proc.stderr
    run = only_run(workdir)
    results = json.loads((run / "results.json").read_text())
    assert results["status"] == "completed" and results["loss"] == "CRD"
    row = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert row["crd_student"] > 0 and row["crd_teacher"] > 0 and "ce" in row
    model_keys = set(torch.load(run / "model.pt", weights_only=True)["model"])
    assert model_keys == set(LeNet5([1, 28, 28], 10).state_dict())  # the student alone: no heads, no banks
    objective = torch.load(run / "checkpoints" / "last.pt", weights_only=True)["objective"]
    assert objective["bank_s"].shape == (300, 128) and (objective["z"] > 0).all()
    assert torch.allclose(objective["bank_s"].norm(dim=1), torch.ones(300), atol=1e-5)  # every row updated


@pytest.mark.slow
def test_crd_killed_mid_training_resumes_bit_identical(kdrun_here, env, tmp_path, workdir, cnn_teachers):
    use_teachers(cnn_teachers, workdir)
    # 300 images, batch 128: 3 steps an epoch, killed in the second
    run, reference = kill_and_resume(kdrun_here, env, tmp_path, workdir, distill_args(2), step=4)
    assert_resumed_identically(run, reference)  # the banks, Z and the negatives' generator included
    assert {"bank_s", "bank_t", "z", "_extra_state"} <= torch.load(run / "checkpoints" / "last.pt",
                                                                   weights_only=True)["objective"].keys()


BAD = [
    (["loss.max_memory_gb=0.0001"],
     "kdrun: error: loss=crd: the memory banks need 0.293 MiB (2 x 300 rows x 128 x 4 bytes), over 0.102 MiB "
     "(loss.max_memory_gb=0.0001); lower loss.feat_dim or raise loss.max_memory_gb"),
    (["loss.nce_k=0"], "kdrun: error: invalid loss config: nce_k must be an integer >= 1, got 0"),
    (["loss.nce_m=1"], "kdrun: error: invalid loss config: nce_m must be a number in [0, 1), got 1"),
    (["loss.crd_weight=-1"], "kdrun: error: invalid loss config: crd_weight must be a number >= 0, got -1"),
]


@pytest.mark.slow
@pytest.mark.parametrize("extra, message", BAD, ids=[" ".join(e) for e, _ in BAD])
def test_a_bad_crd_config_is_one_line_before_anything_is_written(kdrun, workdir, cnn_teachers, extra, message):
    use_teachers(cnn_teachers, workdir)
    proc = kdrun(*distill_args(1, *extra), check=False)
    assert (proc.returncode, proc.stderr.strip().splitlines()[-1]) == (2, message)
    assert "Traceback" not in proc.stderr and not (workdir / "runs").exists()
