"""Sweeps through Hydra's joblib and submitit launchers (the `launchers` extra): jobs run in other
processes, share the teacher store and the soft-target cache, and their failures still reach the CLI."""

import csv

import pytest

from conftest import QUICK, use_teachers

pytestmark = pytest.mark.slow  # sweeps whose jobs run in other processes

TEACHER = ["teacher=mlp30", "teacher.recipe.epochs=1"]


def summary(workdir):
    sweep = max((workdir / "sweeps" / "distill").iterdir())
    return list(csv.DictReader(open(sweep / "summary.csv")))


def test_joblib_runs_two_jobs_in_parallel_on_one_cache(kdrun, workdir, mlp30_teachers):
    use_teachers(mlp30_teachers, workdir)  # what `kdrun train *TEACHER *QUICK` stores
    out = kdrun("distill", *TEACHER, *QUICK, "epochs=1", "-m", "T=2,8", "hydra/launcher=joblib",
                "hydra.launcher.n_jobs=2")
    assert out.stderr.count("soft targets: wrote") == 1 and out.stderr.count("soft targets: reusing") == 1
    rows = summary(workdir)
    assert [(r["T"], r["status"]) for r in rows] == [("2", "completed"), ("8", "completed")]
    caches = list((workdir / "soft_targets").glob("*/*.pt"))
    assert len(caches) == 1


def test_submitit_local_gives_the_same_results_as_the_basic_launcher(kdrun, workdir, mlp30_teachers):
    use_teachers(mlp30_teachers, workdir)
    kdrun("distill", *TEACHER, *QUICK, "epochs=1", "-m", "T=2,8")
    basic = summary(workdir)
    kdrun("distill", *TEACHER, *QUICK, "epochs=1", "-m", "T=2,8", "hydra/launcher=submitit_local")
    submitit = summary(workdir)
    assert [(r["T"], r["status"], r["test_errors"]) for r in submitit] == \
           [(r["T"], r["status"], r["test_errors"]) for r in basic]


def test_a_job_failing_in_a_joblib_worker_fails_the_sweep(kdrun, workdir):
    proc = kdrun("distill", "teacher=mlp30", *QUICK, "alpha=0", "epochs=1", "-m", "lr=0.001,1e30",
                 "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", check=False)
    assert proc.returncode == 2
    assert proc.stderr.splitlines()[-1].startswith("kdrun: error: 1 sweep job(s) failed; first: loss is ")
    assert [r["status"] for r in summary(workdir)] == ["completed", "failed"]
