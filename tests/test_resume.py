"""Exact resume: a run stopped anywhere (SIGKILL mid-step, mid-checkpoint-write, mid-cache-write,
between a metrics row and its checkpoint; SIGTERM) and resumed ends bit-identical to one never
stopped, with the same metrics. Sweeps resume their unfinished jobs only."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import KDRUN, QUICK

pytestmark = pytest.mark.slow  # runs killed in subprocesses and resumed
FAULT_AT = [sys.executable, str(Path(__file__).with_name("fault_at.py"))]
TEACHER = ["teacher=mlp1200", "teacher.recipe.epochs=3"]  # dropout, max-norm and jitter: every random stream
DISTILL = ["distill", *TEACHER, *QUICK, "epochs=3", "T=5"]  # 1000 images, batch 128: 8 steps an epoch


def weights(run_dir):
    return torch.load(Path(run_dir) / "model.pt", weights_only=True)["model"]


def assert_same_weights(a, b):
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


def metrics(run_dir):
    rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "seconds"} for r in rows]


def only_run(workdir, command):
    runs = list((workdir / "runs" / command).iterdir())
    assert len(runs) == 1, runs
    return runs[0]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data_dir):
    """A workdir with the trained teacher, and a distill run that was never stopped."""
    import os

    work = tmp_path_factory.mktemp("reference")
    env = {**os.environ, "KDRUN_WORKDIR": str(work), "KDRUN_DATA": str(data_dir)}
    for args in (["train", *TEACHER, *QUICK], DISTILL, [*DISTILL, "-m", "seed=1"]):
        subprocess.run([*KDRUN, *args], env=env, check=True, capture_output=True, cwd=work)
    return work


def stopped(env, tmp_path, site, n, *args):
    return subprocess.run([*FAULT_AT, site, str(n), *args], env=env, cwd=tmp_path, capture_output=True, text=True,
                          timeout=600)


@pytest.mark.parametrize("site, n", [("step", 11), ("checkpoint", 2), ("epoch-end", 2), ("cache", 1)])
def test_a_distill_killed_anywhere_resumes_bit_identical(kdrun, env, tmp_path, workdir, reference, site, n):
    shutil.copytree(reference / "teachers", workdir / "teachers")  # the teacher, not its soft targets
    proc = stopped(env, tmp_path, site, n, *DISTILL)
    assert proc.returncode == -9, proc.stderr[-2000:]
    run = only_run(workdir, "distill")
    assert not (run / "model.pt").exists()
    if site == "cache":  # killed holding the cache's lock: its file stays, and must not block the resume
        assert list((workdir / "soft_targets").glob("*/*.pt.lock")) and not list(workdir.glob("soft_targets/*/*.pt"))
    out = kdrun("resume", str(run))
    assert "Traceback" not in out.stderr
    assert_same_weights(run, only_run(reference, "distill"))
    assert metrics(run) == metrics(only_run(reference, "distill"))
    assert json.loads((run / "results.json").read_text())["status"] == "completed"
    assert kdrun("resume", str(run)).stdout == f"kdrun: {run} is complete; nothing to resume\n"


def test_sigterm_checkpoints_mid_epoch_and_says_how_to_resume(kdrun, env, tmp_path, workdir, reference):
    shutil.copytree(reference / "teachers", workdir / "teachers")
    proc = stopped(env, tmp_path, "sigterm", 13, *DISTILL)
    run = only_run(workdir, "distill")
    assert proc.returncode == 143
    assert proc.stderr.splitlines()[-1] == f"kdrun: interrupted; resume with: kdrun resume {run}"
    assert json.loads((run / "results.json").read_text())["status"] == "interrupted"
    checkpoint = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert (checkpoint["epoch"], checkpoint["batch"], checkpoint["step"]) == (1, 5, 13)  # stopped after its step
    kdrun("resume", str(run))
    assert_same_weights(run, only_run(reference, "distill"))


def test_a_teacher_killed_while_training_resumes_from_the_store(kdrun, env, tmp_path, workdir, reference):
    proc = stopped(env, tmp_path, "step", 12, "train", *TEACHER, *QUICK)
    assert proc.returncode == -9
    key = next(p.name for p in (reference / "teachers").iterdir() if p.is_dir())
    assert (workdir / "teachers" / key / "training" / "last.pt").is_file()  # in the store, for whoever comes next
    out = kdrun("train", *TEACHER, *QUICK)
    assert f"teacher {key}: resuming its unfinished training from" in out.stderr
    stored = torch.load(workdir / "teachers" / key / "model.pt", weights_only=True)["model"]
    expected = torch.load(reference / "teachers" / key / "model.pt", weights_only=True)["model"]
    assert all(torch.equal(stored[k], expected[k]) for k in expected)
    assert not (workdir / "teachers" / key / "training").exists()
    assert "is already trained" in kdrun("train", *TEACHER, *QUICK).stderr


def test_a_killed_sweep_resumes_its_unfinished_jobs_only(kdrun, env, tmp_path, workdir, reference):
    shutil.copytree(reference / "teachers", workdir / "teachers")
    proc = stopped(env, tmp_path, "step", 24 + 10, *DISTILL, "-m", "seed=0,1")  # job 0 done, job 1 in epoch 2
    assert proc.returncode == -9
    sweep = next((workdir / "sweeps" / "distill").iterdir())
    finished = (sweep / "0" / "model.pt").stat().st_mtime_ns
    kdrun("resume", str(sweep))
    assert (sweep / "0" / "model.pt").stat().st_mtime_ns == finished  # left alone
    assert_same_weights(sweep / "0", only_run(reference, "distill"))
    reference_seed_1 = next((reference / "sweeps" / "distill").iterdir()) / "0"
    assert_same_weights(sweep / "1", reference_seed_1)
    summary = (sweep / "summary.csv").read_text().splitlines()
    assert [line.split(",")[:3] for line in summary[1:]] == [["0", "0", "completed"], ["1", "1", "completed"]]


def test_self_distillation_resumes_with_its_views_generator(kdrun, env, tmp_path, workdir):
    args = ["self-distill", "student=lenet5", *QUICK, "epochs=2"]
    kdrun(*args)
    reference_run = only_run(workdir, "self-distill")
    shutil.move(str(reference_run), str(tmp_path / "reference_run"))
    assert stopped(env, tmp_path, "step", 11, *args).returncode == -9
    run = only_run(workdir, "self-distill")
    kdrun("resume", str(run))
    assert_same_weights(run, tmp_path / "reference_run")


@pytest.mark.parametrize("site, reason", [("disk-full", "No space left on device"), ("read-only", "Read-only file system")])
def test_a_failed_checkpoint_write_is_one_line_and_keeps_the_last_good_checkpoint(env, tmp_path, workdir, reference,
                                                                                   site, reason):
    shutil.copytree(reference / "teachers", workdir / "teachers")
    proc = stopped(env, tmp_path, site, 2, *DISTILL)
    run = only_run(workdir, "distill")
    assert proc.returncode == 1
    assert proc.stderr.splitlines()[-1] == f"kdrun: error: cannot write {run}/checkpoints/last.pt: {reason}"
    assert "Traceback" not in proc.stderr
    assert torch.load(run / "checkpoints" / "last.pt", weights_only=True)["epoch"] == 1  # epoch 1's, intact
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["last.pt"]  # no temp file left
    assert json.loads((run / "results.json").read_text())["status"] == "failed"


def test_a_checkpoint_of_another_configuration_or_a_damaged_one_is_refused(kdrun, env, tmp_path, workdir, reference):
    shutil.copytree(reference / "teachers", workdir / "teachers")
    assert stopped(env, tmp_path, "step", 11, *DISTILL).returncode == -9
    run = only_run(workdir, "distill")
    checkpoint = run / "checkpoints" / "last.pt"
    saved = checkpoint.read_bytes()
    overrides = run / ".hydra" / "overrides.yaml"
    overrides.write_text(overrides.read_text().replace("T=5", "T=6"))
    proc = kdrun("resume", str(run), check=False)
    assert (proc.returncode, proc.stderr.splitlines()[-1]) == (2, f"kdrun: error: checkpoint {checkpoint} was made by "
                                                               "another configuration (kdrun distill of mlp800, seed 0); "
                                                               "it cannot be resumed by this one")
    assert checkpoint.read_bytes() == saved
    overrides.write_text(overrides.read_text().replace("T=6", "T=5"))
    checkpoint.write_bytes(saved[: len(saved) // 3])
    proc = kdrun("resume", str(run), check=False)
    assert (proc.returncode, proc.stderr.splitlines()[-1]) == (
        2, f"kdrun: error: corrupt checkpoint {checkpoint}: not a PyTorch zip archive")


def test_a_killed_pipeline_keeps_its_finished_runs_and_resumes_the_rest(kdrun, env, tmp_path, workdir, reference):
    args = ["pipeline", *TEACHER, *QUICK, "student.recipe.epochs=2"]  # the reference's teacher; 16 steps a run
    for work in (workdir, tmp_path / "uninterrupted"):
        shutil.copytree(reference / "teachers", work / "teachers")
    kdrun(*args, extra_env={"KDRUN_WORKDIR": str(tmp_path / "uninterrupted")})
    assert stopped(env, tmp_path, "step", 16 + 5, *args).returncode == -9  # in the second run, `distilled`
    run = only_run(workdir, "pipeline")
    finished = (run / "student_alone" / "model.pt").stat().st_mtime_ns
    out = kdrun("resume", str(run))
    assert f"pipeline: {run / 'student_alone'} is complete; kept" in out.stderr
    assert (run / "student_alone" / "model.pt").stat().st_mtime_ns == finished
    expected = only_run(tmp_path / "uninterrupted", "pipeline")
    for name in ("student_alone", "distilled"):
        assert_same_weights(run / name, expected / name)
    assert json.loads((run / "results.json").read_text())["status"] == "completed" and (run / "report.md").is_file()
