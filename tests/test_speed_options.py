"""What issue 7 changed for speed keeps the results: max-norm in place, CPU dropout masks, the deferred
NaN check of accelerators, bf16 autocast, torch.compile, fused optimisers."""

import json
from pathlib import Path

import pytest
import torch

from conftest import QUICK, use_teachers
from kdrun import store
from kdrun.errors import KdrunError
from kdrun.loop import FiniteLoss
from kdrun.models import MLP
from kdrun.models.base import Dropout
from test_units import DATA, config

TEACHER = ["teacher=mlp30", "teacher.recipe.epochs=1"]
STUDENT = ["student=mlp30", "epochs=2", "T=2"]


def test_max_norm_in_place_is_torch_renorm():
    torch.manual_seed(0)
    model = MLP([1, 4, 4], 3, [6, 5])
    norms = torch.cat([p.detach().norm(dim=1) for name, p in model.named_parameters() if name.endswith("weight")])
    model.max_norm = float(norms.median())  # rows on both sides of the bound
    expected = {name: torch.renorm(p, 2, 0, model.max_norm) if name.endswith("weight") else p.clone()
                for name, p in model.named_parameters()}
    model.constrain()
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), expected[name], msg=name)


@pytest.mark.parametrize("p", [0.2, 0.5])
def test_cpu_dropout_keeps_1_minus_p_and_scales_by_its_inverse(p):
    torch.manual_seed(0)
    layer = Dropout(p)
    x = torch.ones(400, 500, requires_grad=True)
    y = layer(x)
    kept = y != 0
    assert kept.float().mean().item() == pytest.approx(1 - p, abs=0.005)
    p_used = round(p * 2**16) / 2**16  # p rounded to 16 bits, and the scale exact for it
    assert abs(p_used - p) <= 2**-17
    torch.testing.assert_close(y[kept], torch.full_like(y[kept], 1 / (1 - p_used)))
    y.sum().backward()
    torch.testing.assert_close(x.grad, kept.float() / (1 - p_used))  # the gradient flows through the kept units only
    layer.eval()
    assert torch.equal(layer(x), x)


def test_cpu_dropout_units_cut_from_one_draw_are_independent():
    torch.manual_seed(0)
    kept = (Dropout(0.5)(torch.ones(1_000_000)) != 0).float()
    for lag in (1, 2, 3, 4):  # four units share a 64-bit draw: neighbours, and the next draw's
        both = (kept[:-lag] * kept[lag:]).mean().item()
        assert both == pytest.approx(0.25, abs=0.003), lag
    torch.manual_seed(1)
    assert not torch.equal(Dropout(0.5)(torch.ones(1000)), Dropout(0.5)(torch.ones(1000)))  # fresh draws each call


def test_an_accelerator_loss_is_checked_when_the_epoch_ends_naming_the_first_bad_step():
    guard = FiniteLoss(torch.device("cuda"))  # the device object only: nothing runs on it
    for step, value in enumerate([1.0, 2.0, float("inf"), float("nan")]):
        guard.observe(torch.tensor(value), 0, step, 0.1)  # no step raises: nothing waits for the device
    with pytest.raises(KdrunError, match=r"^loss is inf at epoch 1 step 3 \(lr=0\.1\)$"):
        guard.check()
    eager = FiniteLoss(torch.device("cpu"))
    with pytest.raises(KdrunError, match=r"^loss is nan at epoch 2 step 5 "):
        eager.observe(torch.tensor(float("nan")), 1, 4, 0.1)


def _last_run(workdir):
    return max((workdir / "runs" / "distill").iterdir(), key=lambda p: p.stat().st_mtime)


def _rows(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture
def kdrun(kdrun_here):
    """The CLI in this process: the three runs are compared, their processes are not the point."""
    return kdrun_here


def test_bf16_and_compile_train_the_same_student(kdrun, workdir, mlp30_teachers):
    use_teachers(mlp30_teachers, workdir)  # what `kdrun train *TEACHER *QUICK` stores
    kdrun("distill", *TEACHER, *STUDENT, *QUICK)
    eager = _last_run(workdir)
    kdrun("distill", *TEACHER, *STUDENT, *QUICK, "compile=true")
    compiled = _last_run(workdir)
    kdrun("distill", *TEACHER, *STUDENT, *QUICK, "precision=bf16")
    bf16 = _last_run(workdir)
    weights = {run: torch.load(run / "model.pt", weights_only=True)["model"] for run in (eager, compiled, bf16)}
    assert weights[eager].keys() == weights[compiled].keys() == weights[bf16].keys()  # no _orig_mod. prefix
    for name, w in weights[eager].items():
        torch.testing.assert_close(weights[compiled][name], w, rtol=1e-4, atol=1e-5)
        assert weights[bf16][name].dtype == torch.float32  # autocast keeps float32 weights
        assert (weights[bf16][name] - w).abs().max() < 0.05  # bfloat16 matmuls: close, not equal
    assert [r["test_errors"] for r in _rows(compiled)] == [r["test_errors"] for r in _rows(eager)]
    for a, b in zip(_rows(bf16), _rows(eager)):
        assert a["loss"] == pytest.approx(b["loss"], rel=0.02) and abs(a["test_errors"] - b["test_errors"]) <= 10
    saved = json.loads((bf16 / "results.json").read_text())
    assert saved["status"] == "completed"
    assert "precision: bf16" in (bf16 / "config.yaml").read_text()


def test_a_missing_teacher_names_its_own_key_and_deletes_what_the_stored_one_lacks(tmp_path):
    cfg = config("distill", ["teacher=mlp30", f"workdir={tmp_path}"])
    stored = store.teacher_identity(cfg, 0, DATA)
    del stored["teacher"]["recipe"]["optimizer"]["fused"]  # a teacher stored before the recipe had the key
    entry = tmp_path / "teachers" / "old"
    entry.mkdir(parents=True)
    (entry / "teacher.json").write_text(json.dumps({"identity": stored}))
    message = store.missing_teacher_message(store.teacher_identity(cfg, 0, DATA), tmp_path, "kdrun train ...")
    assert f"(key {store.teacher_key(cfg, 0, DATA)})" in message
    assert message.endswith("or use the stored one trained with ~teacher.recipe.optimizer.fused by adding that to "
                            "your command")
    assert Path(entry).is_dir()
