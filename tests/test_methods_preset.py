"""`kdrun pipeline experiment=methods_fashion` end to end on tiny data: one teacher, the student alone
and every method, each run with its own objective, compared in one report."""

import csv
import json
from pathlib import Path

import pytest

TINY = ["dataset.limit=300", "dataset.test_limit=100", "epochs=1", "pipeline.seeds=[0]", "progress=false"]
METHODS = {"student_alone": "HintonKD", "hinton": "HintonKD", "dkd": "DKD", "dist": "DIST", "fitnet": "FitNet",
           "at": "AttentionTransfer", "rkd": "RKD", "sp": "SimilarityPreserving", "pkt": "PKT", "crd": "CRD"}


@pytest.mark.slow
def test_methods_fashion_runs_every_method_against_one_teacher(kdrun, workdir):
    kdrun("pipeline", "experiment=methods_fashion", *TINY)
    (run,) = (workdir / "runs" / "pipeline").iterdir()
    rows = {r["label"] or r["role"]: r for r in csv.DictReader(open(run / "report.csv"))}
    assert set(rows) == {*METHODS, "teacher"} and rows["teacher"]["teacher"] == "cnn"
    assert rows["student_alone"]["role"] == "student alone" and rows["crd"]["role"] == "distilled"
    keys = set()
    for name, loss in METHODS.items():
        res = json.loads((Path(run) / name / "results.json").read_text())
        assert res["status"] == "completed" and res["loss"] == loss, name
        assert (res["dataset"], res["student"], res["n_train"], res["seed"]) == ("fashion_mnist", "lenet5", 300, 0)
        assert res["jitter"] == 0 and res["epochs"] == 1
        if name == "student_alone":
            assert res["teacher_key"] is None and res["alpha"] == 0
        else:
            keys.add(res["teacher_key"])
    assert len(keys) == 1  # one teacher taught them all
    report = (run / "report.md").read_text()
    assert "## Compared with the method comparisons of Tian et al. 2020" in report
