"""`kdrun report` and the end-of-sweep summary.csv."""

import csv
import json
import statistics
from pathlib import Path

import pytest

from conftest import QUICK, use_teachers
from kdrun.io import read_json, write_json
from kdrun.report import collect, render, summarise, write


def result(tmp, name, **fields):
    base = {"status": "completed", "dataset": "d", "epochs": 3, "n_test": 100, "run_dir": str(tmp / name)}
    write_json(tmp / name / "results.json", {**base, **fields})


def test_summary_means_stds_and_gap_recovered(tmp_path):
    teacher_dir = tmp_path / "teachers" / "k1"
    write_json(teacher_dir / "teacher.json", {"results": {"command": "train", "status": "completed", "dataset": "d",
               "teacher": "big", "epochs": 9, "n_test": 100, "test_errors": 10, "test_accuracy": 0.9, "seed": 0, "teacher_key": "k1",
               "run_dir": "/elsewhere/train"}})
    runs = tmp_path / "sweep"
    for seed, errors in ((0, 40), (1, 44)):
        result(runs, f"alone{seed}", command="distill", student="s", T=4, alpha=0, teacher_key=None, seed=seed,
               test_errors=errors, test_accuracy=1 - errors / 100)
    for T, errs in ((2, (30, 34)), (8, (20, 26))):
        for seed, errors in enumerate(errs):
            result(runs, f"T{T}s{seed}", command="distill", teacher="big", student="s", T=T, alpha=0.9, seed=seed,
                   teacher_key="k1", teacher_ckpt=str(teacher_dir / "model.pt"), test_errors=errors,
                   test_accuracy=1 - errors / 100)
    result(runs, "broken", command="distill", status="failed", error="loss is nan at epoch 1 step 3 (lr=1e+30)")
    rows, failed = summarise(collect([runs]))
    by_role = {(r["role"], r["T"]): r for r in rows}
    assert set(by_role) == {("teacher", None), ("student alone", None), ("distilled", 2), ("distilled", 8)}
    alone, t8 = by_role[("student alone", None)], by_role[("distilled", 8)]
    assert (alone["errors_mean"], alone["n"]) == (42, 2) and alone["errors_std"] == pytest.approx(statistics.stdev([40, 44]))
    assert t8["errors_mean"] == 23 and t8["seeds"] == [0, 1]
    assert t8["gap_recovered"] == pytest.approx((42 - 23) / (42 - 10))
    assert by_role[("distilled", 2)]["gap_recovered"] == pytest.approx((42 - 32) / 32)
    assert len(failed) == 1 and "loss is nan" in render(rows, failed, "t")
    text, _ = write([runs], tmp_path / "out")
    assert "| distilled " in text and "59.4%" in text  # (42 - 23) / 32
    assert (tmp_path / "out" / "report.png").stat().st_size > 1000
    table = list(csv.DictReader(open(tmp_path / "out" / "report.csv")))
    assert [r["role"] for r in table] == ["teacher", "student alone", "distilled", "distilled"]


@pytest.fixture
def kdrun(kdrun_here):
    """The CLI in this process: these tests are about what it writes, not about its process."""
    return kdrun_here


def test_sweep_summary_and_report_from_the_cli(kdrun, workdir, tmp_path, mlp30_teachers):
    teacher = ["teacher=mlp30", "teacher.recipe.epochs=1"]
    use_teachers(mlp30_teachers, workdir)  # what `kdrun train *teacher *QUICK` stores
    kdrun("distill", *teacher, *QUICK, "epochs=1", "-m", "T=2,8", "seed=0,1")
    sweep = next((workdir / "sweeps" / "distill").iterdir())
    summary = list(csv.DictReader(open(sweep / "summary.csv")))
    assert len(summary) == 4 and {(r["T"], r["seed"]) for r in summary} == {("2", "0"), ("2", "1"), ("8", "0"), ("8", "1")}
    for row in summary:
        res = json.loads((sweep / row["job"] / "results.json").read_text())
        assert (row["status"], int(row["test_errors"]), float(row["T"])) == ("completed", res["test_errors"], res["T"])
    out = kdrun("report", str(sweep))
    assert (sweep / "report.md").is_file() and (sweep / "report.png").is_file()
    errors = {T: [json.loads((sweep / r["job"] / "results.json").read_text())["test_errors"]
                  for r in summary if r["T"] == T] for T in ("2", "8")}
    for T, errs in errors.items():
        expected = f"{statistics.fmean(errs):.1f} ± {statistics.stdev(errs):.1f}"
        assert any(line.startswith("| distilled ") and f" {T} " in line and expected in line
                   for line in out.stdout.splitlines()), (expected, out.stdout)
    assert any(line.startswith("| teacher ") for line in out.stdout.splitlines())  # found through teacher_ckpt


def test_a_failed_job_gets_its_row_and_the_sweep_exits_non_zero(kdrun, workdir):
    proc = kdrun("distill", "teacher=mlp30", *QUICK, "alpha=0", "epochs=1", "-m", "lr=0.001,1e30", check=False)
    assert proc.returncode == 2
    assert proc.stderr.splitlines()[-1].startswith("kdrun: error: 1 sweep job(s) failed; first: loss is ")
    sweep = next((workdir / "sweeps" / "distill").iterdir())
    ok, bad = csv.DictReader(open(sweep / "summary.csv"))  # in job order: lr=0.001, then lr=1e30
    assert (float(ok["lr"]), ok["status"], float(bad["lr"]), bad["status"]) == (0.001, "completed", 1e30, "failed")
    assert bad["error"].startswith("loss is ") and bad["test_errors"] == ""
    out = Path(sweep) / "report"
    report = kdrun("report", str(sweep), "--out", str(out))
    assert "Failed runs:" in report.stdout and "loss is " in report.stdout


def test_ensemble_gain_kept_is_measured_seed_by_seed(tmp_path):
    # members make 50 and 54 errors (mean 52), their ensemble 42: a gain of 10 errors
    members = [{"member": f"teacher.members[{i}]", "key": f"m{i}", "sha256": "s", "test_errors": e, "n_params": 7}
               for i, e in enumerate((50, 54))]
    write_json(tmp_path / "teachers" / "ens" / "teacher.json", {"results": {
        "command": "train", "status": "completed", "label": "ensemble", "dataset": "d", "teacher": "ensemble(2x s)",
        "n_test": 100, "test_errors": 42, "test_accuracy": 0.58, "teacher_key": "ens", "n_params": 14,
        "members": members, "members_test_errors_mean": 52.0, "run_dir": "/elsewhere"}})
    runs = tmp_path / "runs"
    for seed, errors in enumerate((44, 47, 50)):
        result(runs, f"d{seed}", command="distill", label="same_size", teacher="ensemble(2x s)", student="s", T=4,
               alpha=1, seed=seed, teacher_key="ens", n_params=7, test_errors=errors, test_accuracy=1 - errors / 100,
               teacher_ckpt=str(tmp_path / "teachers" / "ens" / "model.pt"))
    result(runs, "wide", command="distill", label="wider", teacher="ensemble(2x s)", student="w", T=4, alpha=1, seed=0,
           teacher_key="ens", n_params=9, test_errors=45, test_accuracy=0.55,
           teacher_ckpt=str(tmp_path / "teachers" / "ens" / "model.pt"))
    rows, _ = summarise(collect([runs]))
    by_name = {r["name"]: r for r in rows}
    kept = [(52 - e) / 10 for e in (44, 47, 50)]  # 80%, 50%, 20%
    same = by_name["same_size"]
    assert same["gain_kept"] == pytest.approx(statistics.fmean(kept))
    assert same["gain_kept_std"] == pytest.approx(statistics.stdev(kept))
    assert by_name["wider"]["gain_kept"] is None  # the paper's measure is for a model of the members' size
    text, _ = write([runs], tmp_path / "out")
    line = next(x for x in text.splitlines() if x.startswith("| same_size "))
    assert "| 50.0% ± 30.0% " in line
    table = {r["label"]: r for r in csv.DictReader(open(tmp_path / "out" / "report.csv"))}
    assert float(table["same_size"]["gain_kept_std"]) == pytest.approx(0.3)


def test_each_seed_with_its_own_teacher_is_one_row_against_the_teachers_mean(tmp_path):
    # teacher_seed=same: seed 0 distils from teacher k0 (10 errors), seed 1 from k1 (14)
    config = {"teacher": {"name": "big"}, "student": {"name": "s"}, "dataset": {"name": "d"}, "teacher_seed": "same"}
    runs = tmp_path / "runs"
    for seed, (key, teacher_errors, alone, distilled) in enumerate((("k0", 10, 40, 20), ("k1", 14, 44, 24))):
        write_json(tmp_path / "teachers" / key / "teacher.json", {"results": {
            "command": "train", "status": "completed", "dataset": "d", "teacher": "big", "n_test": 100, "seed": seed,
            "test_errors": teacher_errors, "test_accuracy": 1 - teacher_errors / 100, "teacher_key": key,
            "run_dir": f"/elsewhere/{key}", "config": {"teacher": {"name": "big"}, "dataset": {"name": "d"}, "seed": seed}}})
        result(runs, f"alone{seed}", command="distill", student="s", alpha=0, seed=seed, teacher_key=None,
               test_errors=alone, test_accuracy=1 - alone / 100, config={**config, "seed": seed, "alpha": 0})
        result(runs, f"kd{seed}", command="distill", teacher="big", student="s", T=20, alpha=0.9, seed=seed,
               teacher_key=key, teacher_ckpt=str(tmp_path / "teachers" / key / "model.pt"), test_errors=distilled,
               test_accuracy=1 - distilled / 100, config={**config, "seed": seed, "alpha": 0.9})
    teacher_run = tmp_path / "train_k1"  # seed 1's teacher is found first: its own run dir comes first
    write_json(teacher_run / "results.json", read_json(tmp_path / "teachers" / "k1" / "teacher.json")["results"])
    rows, _ = summarise(collect([teacher_run, runs]))
    by_role = {r["role"]: r for r in rows}
    assert len(rows) == 3 and [by_role[k]["n"] for k in ("teacher", "student alone", "distilled")] == [2, 2, 2]
    assert by_role["teacher"]["errors_mean"] == 12 and by_role["distilled"]["seeds"] == [0, 1]
    assert by_role["distilled"]["gap_recovered"] == pytest.approx((42 - 22) / (42 - 12))
