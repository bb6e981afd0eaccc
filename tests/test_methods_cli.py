"""The methods from the command line: `kdrun distill loss=<method>` end to end on a small Fashion-MNIST
subset, killed with SIGKILL and resumed bit-identically, the logit ones through a fused T sweep equal to
their own runs, and a -m sweep over methods and seeds."""

import csv
import json
from pathlib import Path

import pytest
import torch

from conftest import CNN_TEACHER, FEATURE_SUBSET, QUICK, use_teachers
from kill_resume import assert_resumed_identically, kill_and_resume

SMALL, CNN = FEATURE_SUBSET, CNN_TEACHER  # 300 Fashion-MNIST images, the session's cnn teacher (cnn_teachers)
STUDENT = ["student=lenet5", "student.recipe.jitter=0", "epochs=1"]  # cached soft targets: no jitter

pytestmark = pytest.mark.slow


@pytest.fixture
def here(kdrun_here, workdir, cnn_teachers):
    use_teachers(cnn_teachers, workdir)
    return kdrun_here


def newest(folder):
    return max(Path(folder).iterdir(), key=lambda p: p.stat().st_mtime)


def weights(run_dir):
    return torch.load(Path(run_dir) / "model.pt", weights_only=True)["model"]


def rows(run_dir):
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("method, extra, terms", [
    ("rkd", [], {"ce", "rkd_distance", "rkd_angle"}),
    ("sp", [], {"ce", "sp_0"}),
    ("pkt", [], {"ce", "pkt"}),
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


# every method but those with resume tests of their own (fitnet and at: test_feature_objectives.py, crd:
# test_crd.py), on the smallest models: mlp30 from an mlp30 (SP compares the second hidden layers)
RESUMED = {
    "hinton standardize": ["loss=hinton", "loss.standardize=true"],
    "dkd": ["loss=dkd"],
    "dist": ["loss=dist"],
    "rkd": ["loss=rkd"],
    "sp": ["loss=sp"],
    "pkt": ["loss=pkt"],
}


@pytest.mark.parametrize("method", RESUMED)
def test_a_method_killed_mid_training_resumes_bit_identical(kdrun_here, env, tmp_path, workdir, mlp30_teachers,
                                                            method):
    use_teachers(mlp30_teachers, workdir)
    args = ["distill", *RESUMED[method], "teacher=mlp30", "teacher.recipe.epochs=1", "student=mlp30", "epochs=2",
            *QUICK]
    # 1000 images, batch 128: 8 steps an epoch, killed after the second step of the second
    run, reference = kill_and_resume(kdrun_here, env, tmp_path, workdir, args, step=10)
    assert_resumed_identically(run, reference)


# the logit methods (HintonKD without standardize: test_fused.py) and the class name results.json records
FUSED = {
    "hinton standardize": (["loss=hinton", "loss.standardize=true"], "HintonKD"),
    "dkd": (["loss=dkd"], "DKD"),
    "dist": (["loss=dist"], "DIST"),
}


@pytest.mark.parametrize("method", FUSED)
def test_a_logit_method_sweeps_T_fused_each_student_as_its_own_run(here, workdir, method):
    extra, name = FUSED[method]
    common = ["distill", *extra, *CNN, "student=mlp30", "epochs=2", *SMALL]  # DKD two epochs into its warm-up
    here(*common, "sweep.fused=true", "T=[2,4]")
    fused = newest(workdir / "runs" / "distill")
    with open(fused / "summary.csv") as f:
        assert [float(r["T"]) for r in csv.DictReader(f)] == [2.0, 4.0]
    for k, T in enumerate((2.0, 4.0)):
        here(*common, f"T={T}")
        alone, student = newest(workdir / "runs" / "distill"), fused / str(k)
        assert json.loads((student / "results.json").read_text())["loss"] == name
        mine, theirs = weights(student), weights(alone)
        assert mine.keys() == theirs.keys()
        for p in mine:  # K students as one batched model: float32 rounding apart (on one thread, DKD's two
            # epochs grow it to 3e-5 on weights of 0.04; a wrong pairing is off by the weights' own size)
            torch.testing.assert_close(mine[p], theirs[p], rtol=1e-3, atol=1e-4, msg=f"student {k}: {p}")
        a, b = rows(student), rows(alone)
        assert [r["test_errors"] for r in a] == [r["test_errors"] for r in b]
        for ra, rb in zip(a, b):
            assert ra.keys() - {"seconds"} == rb.keys() - {"seconds"} and ra["T"] == T
            for key in rb.keys() - {"seconds", "test_errors", "n_test"}:
                assert ra[key] == pytest.approx(rb[key], rel=1e-4, abs=1e-6), (k, key)
    assert rows(fused / "0")[0]["loss"] != rows(fused / "1")[0]["loss"]  # two temperatures, two objectives


def test_methods_and_seeds_sweep_with_multirun(here, workdir):
    here("distill", "-m", "loss=kd,dkd,dist", "seed=0,1", *CNN, *STUDENT, *SMALL)  # kd: loss=hinton by the field's name
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
