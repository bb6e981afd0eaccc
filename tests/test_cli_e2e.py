"""The CLI end to end, in subprocesses, on a Fashion-MNIST subset and on MNIST-shaped IDX files."""

import csv
import json
import subprocess
from pathlib import Path

import pytest
import torch

from conftest import KDRUN, QUICK, use_teachers, write_mnist_like
from kdrun.io import sha256_file

TEACHER = ["teacher=cnn", "teacher.recipe.epochs=1"]
pytestmark = pytest.mark.slow  # the real CLI in subprocesses, training
RESULT_FIELDS = {"command", "status", "dataset", "teacher", "student", "T", "alpha", "seed", "epochs",
                 "test_accuracy", "test_errors", "n_test", "n_params", "wall_s", "teacher_key"}


def results(run_dir):
    return json.loads((Path(run_dir) / "results.json").read_text())


def only(paths):
    paths = list(paths)
    assert len(paths) == 1, paths
    return paths[0]


def test_train_distill_soft_targets_and_sweep_share_one_teacher_and_cache(kdrun, workdir):
    kdrun("train", *TEACHER, *QUICK)
    train_dir = only((workdir / "runs" / "train").iterdir())
    teacher = results(train_dir)
    assert teacher["status"] == "completed" and teacher["teacher"] == "cnn" and teacher["n_test"] == 500
    stored = workdir / "teachers" / teacher["teacher_key"] / "model.pt"
    assert stored.is_file() and sha256_file(stored) == sha256_file(train_dir / "model.pt")
    for name in (".hydra/config.yaml", "train.log", "config.yaml", "metrics.jsonl"):
        assert (train_dir / name).is_file(), name
    assert not (stored.parent / "training").exists()  # its checkpoint lived in the store until it was published

    # distill finds the teacher by key and caches its logits itself (soft-targets was not run)
    out = kdrun("distill", *TEACHER, *QUICK, "epochs=2", "T=20", "alpha=0.5")
    assert "soft targets: wrote" in out.stderr
    run = only((workdir / "runs" / "distill").iterdir())
    res = results(run)
    assert RESULT_FIELDS <= set(res)
    assert (res["status"], res["T"], res["alpha"], res["epochs"], res["student"]) == ("completed", 20, 0.5, 2, "mlp800")
    assert res["teacher_key"] == teacher["teacher_key"] and res["n_test"] == 500
    assert res["test_errors"] == round((1 - res["test_accuracy"]) * 500)
    assert res["n_params"] == 784 * 800 + 800 + 800 * 800 + 800 + 800 * 10 + 10
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    assert {"loss", "ce", "kd_scaled", "kd_unscaled", "train_accuracy", "test_accuracy", "lr", "seconds"} <= set(rows[0])
    assert abs(rows[0]["kd_scaled"] - 400 * rows[0]["kd_unscaled"]) < 1e-3 * rows[0]["kd_scaled"]
    assert rows[-1]["test_errors"] == res["test_errors"]
    model = torch.load(run / "model.pt", weights_only=True)
    assert model["arch"]["hidden"] == [800, 800] and "model" in model

    # soft-targets reuses the cache distill wrote; its manifest names the teacher checkpoint
    cache = only((workdir / "soft_targets" / teacher["teacher_key"]).glob("*.pt"))
    stamp = cache.stat().st_mtime_ns
    out = kdrun("soft-targets", *TEACHER, *QUICK)
    assert "soft targets: reusing" in out.stderr
    payload = torch.load(cache, weights_only=True)
    manifest = payload["manifest"]
    assert manifest["teacher_sha256"] == sha256_file(stored)
    assert manifest["shape"] == [1000, 10] == list(payload["logits"].shape)
    assert (manifest["dataset"], manifest["split"], manifest["dtype"]) == ("fashion_mnist", "train", "float32")

    # a 2-job temperature sweep: both jobs reuse the one cache
    out = kdrun("distill", *TEACHER, *QUICK, "epochs=1", "-m", "T=1,2")
    assert out.stderr.count("soft targets: reusing") == 2 and "soft targets: wrote" not in out.stderr
    assert cache.stat().st_mtime_ns == stamp
    sweep = only((workdir / "sweeps" / "distill").iterdir())
    jobs = sorted(results(d)["T"] for d in sweep.iterdir() if d.is_dir() and (d / "results.json").exists())
    assert jobs == [1, 2]

    # alpha=0 needs no teacher at all: a teacher that was never trained is fine
    kdrun("distill", "teacher=mlp30", *QUICK, "epochs=1", "alpha=0")
    alone = [results(d) for d in (workdir / "runs" / "distill").iterdir() if results(d)["alpha"] == 0]
    assert len(alone) == 1 and alone[0]["teacher_key"] is None and alone[0]["teacher"] is None


def test_two_processes_compute_the_cache_once(kdrun, env, tmp_path, workdir, mlp30_teachers):
    use_teachers(mlp30_teachers, workdir)  # what `kdrun train teacher=mlp30 teacher.recipe.epochs=1 *QUICK` stores
    procs = [subprocess.Popen([*KDRUN, "soft-targets", "teacher=mlp30", "teacher.recipe.epochs=1", *QUICK], env=env, cwd=tmp_path,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    errs = [p.communicate(timeout=300)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errs
    assert sum("soft targets: wrote" in e for e in errs) == 1
    assert sum("soft targets: reusing" in e for e in errs) == 1
    cache = only((workdir / "soft_targets").glob("*/*.pt"))
    assert torch.load(cache, weights_only=True)["logits"].shape == (1000, 10)


def test_pipeline_runs_teacher_alone_distilled_then_reports(kdrun, workdir):
    out = kdrun("pipeline", "teacher=mlp300", "student=mlp30", *QUICK, "epochs=1", "T=5", "alpha=anneal")
    lines = out.stdout.splitlines()
    assert any(line.startswith("| teacher ") and " mlp300 " in line for line in lines)
    assert any(line.startswith("| student_alone ") and " mlp30 " in line for line in lines)
    assert any(line.startswith("| distilled ") and " 5 " in line for line in lines)
    run = only((workdir / "runs" / "pipeline").iterdir())
    teacher, alone, distilled = (results(run / n) for n in ("teacher", "student_alone", "distilled"))
    assert (alone["alpha"], distilled["alpha"]) == (0, 0.9)
    # the student alone never sees the teacher, even when the distilled one anneals alpha
    assert (alone["teacher_key"], alone["alpha_schedule"]) == (None, "Constant")
    assert (distilled["teacher_key"], distilled["alpha_schedule"]) == (teacher["teacher_key"], "Anneal")
    # the pipeline ends with `kdrun report` of what it ran
    table = list(csv.DictReader(open(run / "report.csv")))
    assert [(r["role"], r["label"]) for r in table] == [("teacher", ""), ("student alone", "student_alone"),
                                                        ("distilled", "distilled")]
    gap = (alone["test_errors"] - distilled["test_errors"]) / (alone["test_errors"] - teacher["test_errors"])
    assert float(table[2]["gap_recovered"]) == pytest.approx(gap)
    assert results(run)["runs"] == [str(run / "student_alone"), str(run / "distilled")]
    # a second pipeline reuses the stored teacher instead of training it again
    out = kdrun("pipeline", "teacher=mlp300", "student=mlp30", *QUICK, "epochs=1", "T=5")
    assert "is already trained" in out.stderr and "soft targets: reusing" in out.stderr


def test_mnist_idx_files_written_by_the_test(kdrun, tmp_path):
    data = tmp_path / "mnist_data"
    write_mnist_like(data / "MNIST" / "raw", n_train=300, n_test=100)
    extra = {"KDRUN_DATA": str(data)}
    teacher = ["teacher=mlp300", "teacher.recipe.epochs=3", "progress=false"]
    kdrun("train", *teacher, f"hydra.run.dir={tmp_path / 'my_run'}", extra_env=extra)  # default dataset: mnist
    assert results(tmp_path / "my_run")["dataset"] == "mnist"
    kdrun("distill", *teacher, "student=mlp30", "epochs=3", extra_env=extra)
    res = results(only((tmp_path / "work" / "runs" / "distill").iterdir()))
    assert res["dataset"] == "mnist" and res["n_test"] == 100
    assert res["test_accuracy"] > 0.5  # the bars make the classes easy: the pipeline really learned
