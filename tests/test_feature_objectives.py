"""Objectives that read features and own parameters: the FeatureTap, FitNets and attention transfer
by hand on tiny tensors and by their invariances, what objectives declare, how their parameters are
optimised, checkpointed and averaged under torchrun (both methods under torchrun itself:
test_distributed.py), and both end to end from the CLI, resumed bit-identically after a SIGKILL."""

import json
import math
import re

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn

from conftest import CNN_TEACHER, FEATURE_SUBSET, use_teachers
from kill_resume import assert_resumed_identically, kill_and_resume, only_run
from kdrun.training import attach_objective
from kdrun.data.batches import Batch
from kdrun.errors import KdrunError
from kdrun.models import LeNet5, SmallCNN
from kdrun.models.features import FeatureTap
from kdrun.objectives import AttentionTransfer, CrossEntropy, FitNet, HintonKD, OnlineTeacher, SelfDistillation
from kdrun.objectives.attention import at_loss, attention_map
from kdrun.objectives.base import Needs, needs_of
from kdrun.objectives.fitnet import hint_loss, regressor
from kdrun.schedules import Constant

# ---------------------------------------------------------------- the tap


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(2, 3)

    def forward(self, x):
        return self.head(self.pool(torch.relu(self.conv(x))).flatten(1))


def test_tap_gives_named_outputs_and_the_heads_input_for_that_forward_only():
    torch.manual_seed(0)
    model, x = Tiny(), torch.randn(4, 1, 5, 5)
    tap = FeatureTap(model, {"c": "conv", "p": "pool"})
    with tap.capture() as feats:
        logits = model(x)
    assert torch.equal(feats["c"], model.conv(x))
    assert torch.equal(feats["penultimate"], model.pool(torch.relu(model.conv(x))).flatten(1))
    assert torch.equal(logits, model.head(feats["penultimate"]))
    model(x)  # outside capture: nothing kept
    assert tap._feats is None and set(feats) == {"c", "p", "penultimate"}


def test_tap_works_under_torch_compile():
    torch.manual_seed(0)
    model, x = LeNet5([1, 28, 28], 10), torch.randn(4, 1, 28, 28)
    tap = FeatureTap(model, {"s1": "body.2", "s2": "body.5"})
    with tap.capture() as expected:
        logits = model(x)
    model.compile(backend="eager")  # dynamo traces the hooks; the backend does not matter to them
    for _ in range(2):
        with tap.capture() as feats:
            assert torch.allclose(model(x), logits)
        assert feats.keys() == expected.keys()
        assert all(torch.allclose(feats[k], expected[k]) for k in expected)


def test_tap_refuses_an_unknown_stage_naming_the_models_children():
    with pytest.raises(KdrunError, match=re.escape("the student's stage 's9' is neither in the model config's "
                                                   "features: map (s1, s2) nor a module of Tiny (its top-level "
                                                   "children: conv, pool, head)")):
        FeatureTap(Tiny(), {"s9": "s9"}, named=["s1", "s2"], role="student")
    with pytest.raises(KdrunError, match=re.escape("the teacher's stage 'x' is not a module of Tiny (its top-level "
                                                   "children: conv, pool, head)")):
        FeatureTap(Tiny(), {"x": "conv.weight.x"}, role="teacher")


# ---------------------------------------------------------------- attention transfer by hand

A = torch.tensor([[[[1.0, -2.0]], [[3.0, 0.0]]]])  # [1, 2 channels, 1, 2]: Q = mean_c A^2 = [5, 2]
B = torch.tensor([[[[0.0, 1.0]], [[2.0, 1.0]]]])  # Q = [2, 1]


def test_attention_map_is_the_channel_mean_of_squares_l2_normalised():
    q = attention_map(A)
    assert q[0].tolist() == pytest.approx([5 / math.sqrt(29), 2 / math.sqrt(29)]) and q.shape == (1, 2)


def test_at_loss_by_hand():
    qa = [5 / math.sqrt(29), 2 / math.sqrt(29)]
    qb = [2 / math.sqrt(5), 1 / math.sqrt(5)]
    expected = sum((a - b) ** 2 for a, b in zip(qa, qb)) / 2  # mean over batch (1) and positions (2)
    assert at_loss(A, B).item() == pytest.approx(expected, rel=1e-6)


def test_at_loss_is_zero_for_identical_maps_and_invariant_to_positive_scaling():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(3, 4, 5, 5, generator=g), torch.randn(3, 6, 5, 5, generator=g)
    assert at_loss(s, s.clone()).item() == pytest.approx(0.0, abs=1e-9)
    base = at_loss(s, t).item()
    assert base > 0
    assert at_loss(7.5 * s, t).item() == pytest.approx(base, rel=1e-5)
    assert at_loss(s, 0.01 * t).item() == pytest.approx(base, rel=1e-5)
    assert at_loss(-s, t).item() == pytest.approx(base, rel=1e-5)  # |A|^p: the sign plays no part


def test_at_loss_pools_the_larger_map_to_the_smaller():
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(2, 3, 2, 2, generator=g), torch.randn(2, 5, 4, 4, generator=g)
    assert at_loss(s, t).item() == pytest.approx(at_loss(s, F.avg_pool2d(t, 2)).item(), rel=1e-6)
    assert at_loss(t, s).item() == pytest.approx(at_loss(F.avg_pool2d(t, 2), s).item(), rel=1e-6)


# ---------------------------------------------------------------- FitNets by hand


def test_hint_loss_is_the_mean_squared_error():
    u, v = torch.tensor([[1.0, 2.0], [0.0, -1.0]]), torch.tensor([[0.0, 2.0], [2.0, 1.0]])
    assert hint_loss(v, u).item() == pytest.approx((1 + 0 + 4 + 4) / 4)


@pytest.mark.parametrize("student, teacher, kind, kernel", [
    ((2, 4, 8, 8), (2, 6, 8, 8), nn.Conv2d, (1, 1)),
    ((2, 4, 8, 8), (2, 6, 4, 4), nn.Conv2d, (3, 3)),  # twice the size: stride 2
    ((2, 4, 4, 4), (2, 6, 8, 8), nn.ConvTranspose2d, (4, 4)),  # half: transposed, stride 2
    ((2, 4, 7, 7), (2, 6, 5, 5), nn.Conv2d, (3, 3)),  # larger: kernel 1 + 7 - 5
    ((2, 10), (2, 3), nn.Linear, None),
])
def test_regressor_maps_the_student_shape_onto_the_teachers(student, teacher, kind, kernel):
    r = regressor(student, teacher)
    assert isinstance(r[0], kind)
    if kernel:
        assert tuple(r[0].kernel_size) == kernel
    assert tuple(r(torch.randn(student)).shape) == teacher
    assert (r(torch.randn(student)) >= 0).all()  # ReLU last


def test_regressor_refuses_a_student_map_smaller_than_the_teachers():
    with pytest.raises(KdrunError, match=re.escape("loss=fitnet: the student's guided layer is 5x5, smaller than "
                                                   "the teacher's hint 7x7 (and not half of it)")):
        regressor((2, 4, 5, 5), (2, 4, 7, 7))


class Fixed(nn.Module):
    """A student whose guided layer `g` is its input and whose head is linear."""

    def __init__(self, c=2):
        super().__init__()
        self.g = nn.Identity()
        self.head = nn.Linear(c * 9, 3)

    def forward(self, x):
        return self.head(self.g(x).flatten(1))


class Teacher(nn.Module):
    """A teacher whose hint `h` is its input's channels in reverse order, doubled."""

    def __init__(self):
        super().__init__()
        self.h = nn.Identity()
        self.head = nn.Linear(18, 3)

    def forward(self, x):
        return self.head(self.h(2 * x.flip(1)).flatten(1))


def fitnet_on(student, teacher, **kw):
    signal = OnlineTeacher(teacher, None, FeatureTap(teacher, {"s1": "h"}, penultimate=False))
    objective = FitNet(Constant(4.0), signal, **kw)
    objective.attach(FeatureTap(student, {"s1": "g"}, penultimate=False), torch.zeros(2, 2, 3, 3))
    return objective


def test_fitnet_hint_is_zero_when_the_regressor_maps_student_onto_teacher_exactly():
    torch.manual_seed(0)
    student = Fixed()
    objective = fitnet_on(student, Teacher(), regressor_bn=False, regressor_relu=False)
    conv = objective.regressor[0]
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([[0.0, 2.0], [2.0, 0.0]]).view(2, 2, 1, 1))
        conv.bias.zero_()
    x = torch.randn(5, 2, 3, 3)
    _, loss, logs = objective(student, Batch(x, torch.zeros(5, dtype=torch.long), torch.arange(5)), 0.0)
    assert logs["hint"].item() == 0.0
    assert loss.item() == pytest.approx(logs["ce"].item(), rel=1e-6)  # CE + 100 * 0


def test_fitnet_total_is_ce_plus_kd_plus_weighted_hint_by_hand():
    torch.manual_seed(0)
    student, teacher = Fixed(), Teacher()
    objective = fitnet_on(student, teacher, hint_weight=3.0, ce_weight=0.5, kd_weight=2.0)
    x, y = torch.randn(4, 2, 3, 3), torch.tensor([0, 1, 2, 0])
    logits, loss, logs = objective(student, Batch(x, y, torch.arange(4)), 0.0)
    z, v = student(x), teacher(x)
    hint = (objective.regressor(x) - 2 * x.flip(1)).pow(2).mean()
    kd = 16 * F.kl_div(F.log_softmax(z / 4, -1), F.log_softmax(v / 4, -1), reduction="batchmean", log_target=True)
    expected = 0.5 * F.cross_entropy(z, y) + 2.0 * kd + 3.0 * hint
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert torch.equal(logits, z) and logs["hint"].item() == pytest.approx(hint.item(), rel=1e-6)


def test_at_total_is_ce_plus_beta_times_the_sum_over_pairs():
    torch.manual_seed(0)
    t, s = SmallCNN([1, 12, 12], 3).eval(), LeNet5([1, 12, 12], 3, channels=(2, 3), fc=(4,))
    signal = OnlineTeacher(t, None, FeatureTap(t, {"s1": "body.2", "s2": "body.5"}, penultimate=False))
    objective = AttentionTransfer(Constant(1.0), signal, beta=50.0)
    objective.attach(FeatureTap(s, {"s1": "body.2", "s2": "body.5"}, penultimate=False), torch.zeros(2, 1, 12, 12))
    x, y = torch.randn(6, 1, 12, 12), torch.randint(0, 3, (6,))
    _, loss, logs = objective(s, Batch(x, y, torch.arange(6)), 0.0)
    pairs = [(s.body[:3](x), t.body[:3](x)), (s.body[:6](x), t.body[:6](x))]  # 6x6 vs 6x6, 1x1 vs 3x3
    terms = [at_loss(a, b) for a, b in pairs]
    assert loss.item() == pytest.approx((F.cross_entropy(s(x), y) + 50.0 * sum(terms)).item(), rel=1e-5)
    assert logs["at_1"].item() == pytest.approx(terms[1].item(), rel=1e-6)


# ---------------------------------------------------------------- what objectives declare


def loss_node(alpha_value=0.9, **keys):
    return OmegaConf.create({"alpha_schedule": {"_target_": "kdrun.schedules.Constant", "value": alpha_value},
                             "loss": keys})["loss"]


def test_objectives_declare_what_they_need():
    hinton = {"_target_": "kdrun.objectives.HintonKD", "alpha": "${alpha_schedule}"}
    assert needs_of(loss_node(**hinton)) == Needs(teacher=True)
    assert needs_of(loss_node(0.0, **hinton)) == Needs(teacher=False)
    assert needs_of(loss_node(1.0, **hinton)) == Needs(teacher=True, labels=False)
    fitnet = needs_of(loss_node(_target_="kdrun.objectives.FitNet", teacher_stage="s2", student_stage="s3"))
    assert fitnet == Needs(True, ("s2",), ("s3",)) and fitnet.online_teacher
    at = needs_of(loss_node(_target_="kdrun.objectives.AttentionTransfer", student_stages=["a", "b"],
                            teacher_stages=["c", "c"], ce_weight=0))
    assert at == Needs(True, ("c",), ("a", "b"), labels=False)
    assert CrossEntropy.needs() == Needs() and SelfDistillation.needs().student_features == ("penultimate",)
    assert not HintonKD.needs(loss_node(**hinton)).online_teacher  # logits suffice: the cache serves it


# ---------------------------------------------------------------- owned parameters


def test_owned_parameters_get_their_own_param_group_and_lr_and_stay_out_of_the_model():
    torch.manual_seed(0)
    teacher, student = SmallCNN([1, 28, 28], 10).eval(), LeNet5([1, 28, 28], 10)
    arch = {"features": {"s1": "body.2"}}
    signal = OnlineTeacher(teacher, None, FeatureTap(teacher, {"s1": "body.2"}, penultimate=False))
    objective = FitNet(Constant(4.0), signal, lr=0.01)
    groups = attach_objective(arch, student, objective, (1, 28, 28))
    assert [g.get("lr") for g in groups] == [0.01]
    assert {id(p) for p in groups[0]["params"]} == {id(p) for p in objective.regressor.parameters()}
    assert tuple(objective.regressor[0].kernel_size) == (1, 1)  # 14x14 both: a 1x1 conv, 6 -> 32 channels
    assert not any(p is q for p in student.parameters() for q in objective.parameters())
    assert "regressor.1.running_mean" in objective.state_dict()
    assert attach_objective(arch, student, HintonKD(Constant(4.0), Constant(0.0)), (1, 28, 28)) == []


def test_the_views_generator_is_the_self_distillation_modules_extra_state():
    from kdrun.distortions import Distortions

    a = SelfDistillation(Constant(3.0), 1.0, 0.0, Distortions(), pixels=None, seed=0)
    a.generator.manual_seed(123)
    b = SelfDistillation(Constant(3.0), 1.0, 0.0, Distortions(), pixels=None, seed=5)
    b.load_state_dict(a.state_dict())
    assert torch.equal(a.generator.get_state(), b.generator.get_state())


def _average_in_two_processes(rank, path, out):
    import torch.distributed as dist

    import kdrun.distributed as kd

    dist.init_process_group("gloo", init_method=f"file://{path}", rank=rank, world_size=2)
    try:
        import os

        os.environ["WORLD_SIZE"] = "2"
        p = nn.Parameter(torch.zeros(3))
        p.grad = torch.tensor([1.0, 2.0, 3.0]) * (rank + 1)  # rank 0: g, rank 1: 2g
        kd.average_gradients([p, nn.Parameter(torch.zeros(1))])  # a parameter without a gradient is left alone
        torch.save(p.grad, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # two spawned processes
def test_owned_parameters_gradients_are_averaged_over_torchrun_processes(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_average_in_two_processes, args=(str(tmp_path / "init"), str(tmp_path / "grad")), nprocs=2)
    for rank in (0, 1):
        assert torch.load(tmp_path / f"grad.{rank}").tolist() == [1.5, 3.0, 4.5]


# ---------------------------------------------------------------- end to end, and exact resume

SUBSET, TEACHER = FEATURE_SUBSET, CNN_TEACHER
METHODS = {"fitnet": "hint", "at": "at_1"}


def distill_args(method, epochs=1):
    return ["distill", *TEACHER, "student=lenet5", f"loss={method}", *SUBSET, f"epochs={epochs}"]


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_distill_with_a_feature_objective_from_the_cli(kdrun, workdir, cnn_teachers, method):
    use_teachers(cnn_teachers, workdir)
    kdrun(*distill_args(method))
    run = only_run(workdir)
    results = json.loads((run / "results.json").read_text())
    assert results["status"] == "completed" and results["loss"] in ("FitNet", "AttentionTransfer")
    row = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert row[METHODS[method]] > 0 and "ce" in row
    model_keys = set(torch.load(run / "model.pt", weights_only=True)["model"])
    assert model_keys == set(LeNet5([1, 28, 28], 10).state_dict())  # the student alone: no regressor
    objective = torch.load(run / "checkpoints" / "last.pt", weights_only=True)["objective"]
    assert ("regressor.0.weight" in objective) == (method == "fitnet")
    assert not list(workdir.glob("soft_targets/**/*.pt"))  # the teacher ran online: nothing cached


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_a_feature_objective_killed_mid_training_resumes_bit_identical(kdrun_here, env, tmp_path, workdir,
                                                                        cnn_teachers, method):
    use_teachers(cnn_teachers, workdir)
    # 300 images, batch 128: 3 steps an epoch, killed in the second
    run, reference = kill_and_resume(kdrun_here, env, tmp_path, workdir, distill_args(method, epochs=2), step=5)
    assert_resumed_identically(run, reference)  # the FitNet regressor and its BatchNorm statistics included


BAD = [
    (["loss=fitnet", "loss.student_stage=s9"],
     "kdrun: error: the student's stage 's9' is neither in the model config's features: map (s1, s2, s3, s4) nor a "
     "module of LeNet5 (its top-level children: body, head)"),
    (["loss=at", "loss.teacher_stages=[s1,body.99]"],
     "kdrun: error: the teacher's stage 'body.99' is neither in the model config's features: map (s1, s2, s3) nor a "
     "module of SmallCNN (its top-level children: body, head)"),
    (["loss=fitnet", "loss.student_stage=s2"],
     "kdrun: error: loss=fitnet: the student's guided layer is 5x5, smaller than the teacher's hint 14x14 (and not "
     "half of it); pick stages whose maps are at least as large in the student (loss.student_stage, "
     "loss.teacher_stage)"),
    (["loss=at", "loss.student_stages=[s1,s4]"],
     "kdrun: error: loss=at: attention maps need feature maps [C, H, W]; the student's stage 's4' gives [84], the "
     "teacher's 's2' [64, 7, 7]"),
    (["loss=at", "loss.student_stages=[s1]"],
     "kdrun: error: invalid loss config: student_stages ['s1'] and teacher_stages ['s1', 's2'] must pair up: give as "
     "many of each"),
    (["loss=fitnet", "loss.hint_weight=-1"],
     "kdrun: error: invalid loss config: hint_weight must be a number >= 0, got -1"),
    (["loss=fitnet", "loss.lr=0"], "kdrun: error: invalid loss config: lr must be a number > 0 or null, got 0"),
    (["loss=fitnet", "transfer.labels=false"],
     "kdrun: error: transfer.labels=false needs a loss that trains without labels; FitNet uses them (set "
     "loss.ce_weight=0)"),
    (["loss=at", "teacher=ensemble"],
     "kdrun: error: AttentionTransfer reads the teacher's features, which an ensemble (teacher=ensemble) does not "
     "have; distil from one teacher"),
    (["loss=fitnet", "sweep.fused=true", "T=[1,2]", "student=mlp300", "loss.student_stage=s1", "loss.teacher_stage=s3"],
     "kdrun: error: sweep.fused=true needs an objective on logits alone; FitNet reads features, which fused students "
     "do not give one by one; sweep with -m"),
]


@pytest.mark.slow
@pytest.mark.parametrize("extra, message", BAD, ids=[" ".join(e) for e, _ in BAD])
def test_a_bad_feature_objective_config_is_one_line_before_anything_is_written(kdrun, workdir, cnn_teachers, extra,
                                                                                 message):
    use_teachers(cnn_teachers, workdir)
    proc = kdrun("distill", *TEACHER, "student=lenet5", *SUBSET, *extra, check=False)
    assert (proc.returncode, proc.stderr.strip().splitlines()[-1]) == (2, message)
    assert "Traceback" not in proc.stderr and not (workdir / "runs").exists()


def test_the_documented_twenty_line_objective_trains_its_projection_with_the_student():
    from kdrun.objectives import Objective

    class FeatureL2(Objective):  # as docs/objectives.md writes it
        uses_teacher = True
        teacher_features = student_features = ("penultimate",)

        def __init__(self, teacher=None, weight=1.0, lr=None):
            super().__init__(lr=lr)
            self.teacher, self.weight, self.proj = teacher, float(weight), None

        def attach(self, tap, example):
            super().attach(tap, example)
            s = self.student_shapes(example)["penultimate"]
            t = self.teacher_shapes(example)["penultimate"]
            self.proj = nn.Linear(s[1], t[1])

        def forward(self, model, batch, progress):
            logits, feats = self.student_outputs(model, batch.x)
            _, teacher_feats = self.teacher.outputs(batch)
            l2 = (self.proj(feats["penultimate"]) - teacher_feats["penultimate"]).pow(2).mean()
            ce = F.cross_entropy(logits, batch.y)
            return logits, ce + self.weight * l2, {"ce": ce.detach(), "l2": l2.detach()}

    torch.manual_seed(0)
    teacher, student = SmallCNN([1, 12, 12], 3).eval(), LeNet5([1, 12, 12], 3, channels=(2, 3), fc=(4,))
    assert FeatureL2.needs() == Needs(True, ("penultimate",), ("penultimate",))
    objective = FeatureL2(OnlineTeacher(teacher, None, FeatureTap(teacher, {})))
    groups = attach_objective({}, student, objective, (1, 12, 12))
    assert tuple(objective.proj.weight.shape) == (256, 4) and groups[0]["params"][0] is objective.proj.weight
    x = torch.randn(5, 1, 12, 12)
    _, loss, logs = objective(student, Batch(x, torch.zeros(5, dtype=torch.long), torch.arange(5)), 0.0)
    loss.backward()
    assert objective.proj.weight.grad is not None and logs["l2"] > 0
