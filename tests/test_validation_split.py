"""A validation split carved from what a model trains on (recipe.val_size; a distilled student's
transfer.val_size): never trained on, its errors logged each epoch and kept in results.json, so that a
recipe is chosen on it and never on the test set."""

import json
from pathlib import Path

import torch
from omegaconf import OmegaConf

from conftest import QUICK, use_teachers
from kdrun.data.batches import DeviceData
from kdrun.data.transfer import held_out, select_rows

T30 = ["teacher=mlp30", "teacher.recipe.epochs=1"]


def _split(n=300):
    labels = torch.arange(n) % 10
    return DeviceData(torch.zeros((n, 1, 4, 4), dtype=torch.uint8), labels, 0.5, 0.5, "cpu")


def test_held_out_rows_are_stratified_disjoint_and_the_transfer_splits_rows():
    split = _split()
    rest, val = held_out(split, 50, seed=3)
    (batch,) = val.batches(1000)
    val_rows = set(batch.idx.tolist())
    rest_rows = set(next(rest.batches(1000)).idx.tolist())
    assert len(val_rows) == 50 and not val_rows & rest_rows and len(val_rows | rest_rows) == 300
    assert torch.bincount(val.labels, minlength=10).tolist() == [5] * 10  # stratified by class
    transfer = OmegaConf.create({"val_size": 50, "only_classes": [], "exclude_classes": [], "fraction": 1.0})
    assert sorted(select_rows(split.labels, transfer, 3).val.tolist()) == sorted(val_rows)


def newest(folder):
    return max(Path(folder).iterdir(), key=lambda p: p.stat().st_mtime)


def metrics(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_a_teacher_trained_with_a_validation_split_logs_its_errors_each_epoch(kdrun_here, workdir):
    proc = kdrun_here("train", "teacher=mlp30", "teacher.recipe.epochs=2", "teacher.recipe.val_size=200", *QUICK)
    run = newest(workdir / "runs" / "train")
    results = json.loads((run / "results.json").read_text())
    assert results["n_train"] == 800 and results["n_val"] == 200
    rows = metrics(run)
    assert [r["n_train"] for r in rows] == [800, 800] and all(r["n_val"] == 200 for r in rows)
    assert results["val_errors"] == rows[-1]["val_errors"] and 0 <= results["val_errors"] <= 200
    assert f"val_errors={rows[0]['val_errors']}/200 test_errors=" in proc.stderr
    # another validation split is another teacher: the store keeps both
    kdrun_here("train", "teacher=mlp30", "teacher.recipe.epochs=2", *QUICK)
    assert len([p for p in (workdir / "teachers").iterdir() if p.is_dir()]) == 2


def test_a_distilled_student_logs_its_transfer_validation_errors(kdrun_here, workdir, mlp30_teachers):
    use_teachers(mlp30_teachers, workdir)
    kdrun_here("distill", *T30, "student=mlp30", "epochs=1", "transfer.val_size=100", *QUICK)
    run = newest(workdir / "runs" / "distill")
    (row,) = metrics(run)
    assert row["n_val"] == 100 and row["n_train"] == 900
    assert json.loads((run / "results.json").read_text())["val_errors"] == row["val_errors"]
