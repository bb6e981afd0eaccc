"""A fused sweep (`kdrun distill sweep.fused=true T=[...]`): every student equals its own run."""

import csv
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from conftest import QUICK, use_teachers
from kdrun.models import MLP
from kdrun.models.stacked import StackedModels, has_per_run_state
from kdrun.objectives import HintonKD
from kdrun.objectives.fused import FusedObjectives
from kdrun.objectives.teachers import CachedLogits, OncePerBatch
from kdrun.data.batches import Batch
from kdrun.schedules import Constant

TEACHER = ["teacher=mlp30", "teacher.recipe.epochs=1"]
STUDENT = ["student=mlp30", "epochs=2", "batch_size=96"]  # 96 does not divide the 1000 training images


def rows(run_dir):
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def weights(run_dir):
    return torch.load(Path(run_dir) / "model.pt", weights_only=True)["model"]


def newest(folder):
    return max(Path(folder).iterdir(), key=lambda p: p.stat().st_mtime)


@pytest.fixture
def kdrun(kdrun_here):
    """The CLI in this process (the stopped run below is a subprocess of its own: fault_at.py)."""
    return kdrun_here


def test_each_fused_student_equals_its_own_run_and_reports_as_one(kdrun, workdir, mlp30_teachers):
    use_teachers(mlp30_teachers, workdir)  # what `kdrun train *TEACHER *QUICK` stores
    val = "transfer.val_size=100"  # each student's own validation errors, as its own run logs them
    kdrun("distill", *TEACHER, *STUDENT, *QUICK, val, "sweep.fused=true", "T=[2,5]", "alpha=[0,0.5]")
    fused = newest(workdir / "runs" / "distill")
    points = [(2, 0), (2, 0.5), (5, 0), (5, 0.5)]  # every combination, the last key varying fastest
    with open(fused / "summary.csv") as f:
        summary = list(csv.DictReader(f))
    assert [(float(r["T"]), float(r["alpha"])) for r in summary] == points
    assert json.loads((fused / "results.json").read_text())["role"] == "fused sweep"
    for k, (T, alpha) in enumerate(points):
        kdrun("distill", *TEACHER, *STUDENT, *QUICK, val, f"T={T}", f"alpha={alpha}")
        alone = newest(workdir / "runs" / "distill")
        student = fused / str(k)
        mine, theirs = weights(student), weights(alone)
        assert mine.keys() == theirs.keys()
        for name in mine:
            torch.testing.assert_close(mine[name], theirs[name], rtol=1e-4, atol=1e-5, msg=f"student {k}: {name}")
        a, b = rows(student), rows(alone)
        assert [r["test_errors"] for r in a] == [r["test_errors"] for r in b]
        assert [(r["val_errors"], r["n_val"], r["n_train"]) for r in a] == [(r["val_errors"], 100, 900) for r in b]
        for ra, rb in zip(a, b):
            assert ra.keys() - {"seconds"} == rb.keys() - {"seconds"}
            for key in ("loss", "ce", "kd_scaled", "train_accuracy", "T", "alpha", "lr"):
                if key in rb:
                    assert ra[key] == pytest.approx(rb[key], rel=1e-4, abs=1e-6), (k, key)
        res = json.loads((student / "results.json").read_text())
        assert (res["T"], res["alpha"], res["status"]) == (T, alpha, "completed")
        assert (res["teacher_key"] is None) == (alpha == 0)
        assert res["test_errors"] == int(summary[k]["test_errors"]) == b[-1]["test_errors"]
    table = [line.split("|") for line in kdrun("report", str(fused)).stdout.splitlines() if line.startswith("| ")]
    names = [cells[1].strip() for cells in table]
    assert names.count("distilled") == 2 and names.count("student alone") == 1  # alone: T means nothing, so one row
    assert table[names.index("student alone")][10].strip() == "2"  # of its two students (n)


def test_stacked_gradients_and_max_norm_are_each_members_own():
    torch.manual_seed(0)
    members = [MLP([1, 4, 4], 3, [5, 6], max_norm=0.5) for _ in range(3)]
    stacked = StackedModels(members)
    x, y = torch.randn(7, 1, 4, 4), torch.randint(0, 3, (7,))
    z = stacked.member_logits(x)
    nn.functional.cross_entropy(z.reshape(-1, 3), y.repeat_interleave(3)).mul(3).backward()
    for k, m in enumerate(members):
        torch.testing.assert_close(z[:, k], m(x))
        nn.functional.cross_entropy(m(x), y).backward()
        for name, flipped, p in zip(stacked.names, stacked.flipped, stacked.stacked):
            grad = p.grad.transpose(-1, -2) if flipped else p.grad  # matrices are stacked as [K, in, out]
            torch.testing.assert_close(grad[k], m.get_parameter(name).grad, msg=name)
    with torch.no_grad():
        for p in stacked.stacked:
            p.mul_(10)
        for m in members:
            for p in m.parameters():
                p.mul_(10)
    stacked.constrain()
    for k, m in enumerate(members):
        m.constrain()
        for name, value in stacked.member_state_dict(k).items():
            torch.testing.assert_close(value, m.get_parameter(name).detach(), msg=name)
        assert m.body[2].weight.norm(dim=1).max() <= 0.5 + 1e-6


def test_fused_objective_sums_the_students_and_asks_the_teacher_once_per_batch():
    calls = []
    cache = CachedLogits(torch.randn(10, 3))

    def counting(batch, T=None):
        calls.append(T)
        return cache(batch, T)

    counting.combine = None
    teacher = OncePerBatch(counting)
    students = [HintonKD(Constant(T), Constant(0.5), teacher) for T in (1.0, 4.0)]
    torch.manual_seed(0)
    stacked = StackedModels([MLP([1, 2, 2], 3, [4]) for _ in range(2)])
    batch = Batch(torch.randn(5, 1, 2, 2), torch.randint(0, 3, (5,)), torch.arange(5))
    _, total, logs = FusedObjectives(students)(stacked, batch, 0.0)
    assert len(calls) == 1
    assert float(total.detach()) == pytest.approx(float(logs["loss/0"] + logs["loss/1"]), rel=1e-6)
    assert (logs["T/0"], logs["T/1"]) == (1.0, 4.0)


def test_per_run_state_is_named():
    assert has_per_run_state(MLP([1, 2, 2], 3, [4], dropout_hidden=0.5)) == "dropout"
    assert has_per_run_state(nn.Sequential(nn.BatchNorm1d(3))) == "BatchNorm"
    assert has_per_run_state(MLP([1, 2, 2], 3, [4])) is None


def test_a_killed_fused_sweep_resumes_to_the_same_students(kdrun, env, tmp_path, workdir, mlp30_teachers):
    import subprocess
    import sys

    fault_at = Path(__file__).with_name("fault_at.py")
    args = ["distill", *TEACHER, *STUDENT, *QUICK, "sweep.fused=true", "T=[2,5]", "alpha=0.5"]
    use_teachers(mlp30_teachers, workdir)
    kdrun(*args)
    whole = newest(workdir / "runs" / "distill")
    proc = subprocess.run([sys.executable, str(fault_at), "step", "14", *args], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=600)  # 11 steps an epoch: killed in the second
    assert proc.returncode == -9, proc.stderr[-2000:]
    stopped = newest(workdir / "runs" / "distill")
    assert stopped != whole and not (stopped / "0").exists()
    kdrun("resume", str(stopped))
    for k in ("0", "1"):
        a, b = weights(stopped / k), weights(whole / k)
        assert all(torch.equal(a[name], b[name]) for name in a)
        assert [r["test_errors"] for r in rows(stopped / k)] == [r["test_errors"] for r in rows(whole / k)]
