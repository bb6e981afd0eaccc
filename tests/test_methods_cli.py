"""The methods from the command line: `kdrun distill loss=<method>` end to end on a small Fashion-MNIST
subset, the logit ones through a fused T sweep, and a -m sweep over methods and seeds."""

import csv
import json
from pathlib import Path

import pytest

from conftest import trained_teacher, use_teachers

SMALL = ["dataset=fashion_mnist", "dataset.limit=300", "dataset.test_limit=100", "progress=false"]
CNN = ["teacher=cnn", "teacher.recipe.epochs=1"]
STUDENT = ["student=lenet5", "student.recipe.jitter=0", "epochs=1"]  # cached soft targets: no jitter

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cnn_teacher(tmp_path_factory, data_dir):
    return trained_teacher(tmp_path_factory, data_dir, [*CNN, *SMALL])


@pytest.fixture
def here(kdrun_here, workdir, cnn_teacher):
    use_teachers(cnn_teacher, workdir)
    return kdrun_here


def newest(folder):
    return max(Path(folder).iterdir(), key=lambda p: p.stat().st_mtime)


def rows(run_dir):
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("method, extra, terms", [
    ("rkd", [], {"ce", "rkd_distance", "rkd_angle"}),
    ("sp", [], {"ce", "sp_0"}),
    ("sp", ["loss.student_stages=[s1,s2]", "loss.teacher_stages=[s1,s2]"], {"ce", "sp_0", "sp_1"}),
    ("dkd", [], {"ce", "tckd", "nckd", "warmup"}),
    ("dkd", ["loss.standardize=true", "loss.warmup_epochs=0"], {"ce", "tckd", "nckd", "warmup"}),
    ("dist", [], {"ce", "inter", "intra"}),
    ("hinton", ["loss.standardize=true"], {"ce", "kd_scaled"}),
])
def test_a_method_distils_end_to_end(here, workdir, method, extra, terms):
    here("distill", f"loss={method}", *extra, *CNN, *STUDENT, *SMALL)
    run = newest(workdir / "runs" / "distill")
    results = json.loads((run / "results.json").read_text())
    assert results["status"] == "completed" and results["teacher_key"] is not None
    (row,) = rows(run)
    assert terms <= row.keys() and row["T"] == 4.0
    if method == "dkd":
        assert row["warmup"] == (1.0 if "loss.warmup_epochs=0" in extra else 1 / 20)  # epoch 1 of the warm-up
    assert (run / "model.pt").is_file()


@pytest.mark.parametrize("method", ["dkd", "dist"])
def test_a_logit_method_sweeps_T_fused(here, workdir, method):
    here("distill", f"loss={method}", *CNN, "student=mlp800", "epochs=1", *SMALL, "sweep.fused=true", "T=[2,4]")
    fused = newest(workdir / "runs" / "distill")
    with open(fused / "summary.csv") as f:
        summary = list(csv.DictReader(f))
    assert [float(r["T"]) for r in summary] == [2.0, 4.0]
    for k, T in enumerate((2.0, 4.0)):
        (row,) = rows(fused / str(k))
        assert row["T"] == T
        assert json.loads((fused / str(k) / "results.json").read_text())["loss"] == method.upper()
    assert rows(fused / "0")[0]["loss"] != rows(fused / "1")[0]["loss"]  # two temperatures, two objectives


def test_methods_and_seeds_sweep_with_multirun(here, workdir):
    here("distill", "-m", "loss=hinton,dkd,dist", "seed=0,1", *CNN, *STUDENT, *SMALL)
    sweep = newest(workdir / "sweeps" / "distill")
    losses = sorted(json.loads((sweep / str(i) / "results.json").read_text())["loss"] for i in range(6))
    assert losses == ["DIST", "DIST", "DKD", "DKD", "HintonKD", "HintonKD"]
    with open(sweep / "summary.csv") as f:
        assert len(list(csv.DictReader(f))) == 6


@pytest.mark.parametrize("overrides, message", [
    (["loss=dkd", "loss.nckd_weight=-1"], "invalid loss config: nckd_weight must be a number >= 0, got -1"),
    (["loss=dkd", "loss.standardize=maybe"], "invalid loss config: standardize must be true or false, got 'maybe'"),
    (["loss=dist", "loss.intra_weight=-2"], "invalid loss config: intra_weight must be a number >= 0, got -2"),
    (["loss=rkd", "loss.angle_weight=-1"], "invalid loss config: angle_weight must be a number >= 0, got -1"),
    (["loss=sp", "loss.student_stages=[nope]"], "the student's stage 'nope' is neither in the model config's "
     "features: map (s1, s2, s3, s4) nor a module of LeNet5 (its top-level children: body, head)"),
])
def test_a_bad_knob_is_one_line_and_writes_nothing(here, workdir, overrides, message):
    before = sorted(p for p in workdir.rglob("*"))
    proc = here("distill", *overrides, *CNN, *STUDENT, *SMALL, check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == f"kdrun: error: {message}"
    assert sorted(p for p in workdir.rglob("*")) == before
