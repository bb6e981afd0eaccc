"""`kdrun self-distill`, `kdrun mutual` and born-again generations, end to end on a Fashion-MNIST subset."""

import json
from pathlib import Path

from conftest import QUICK
from kdrun.io import sha256_file

LENET = ["student=lenet5", "epochs=1"]


def results(run_dir):
    return json.loads((Path(run_dir) / "results.json").read_text())


def metrics(run_dir):
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def only(paths):
    paths = list(paths)
    assert len(paths) == 1, paths
    return paths[0]


def test_self_distill_logs_every_term_with_either_kernel_and_every_distortion(kdrun, workdir):
    kdrun("self-distill", *QUICK, *LENET, "loss.mmd_kernel=gaussian", "loss.distortions.flip=true",
          "loss.distortions.noise=0.05", "loss.distortions.erase=0.5", "T=2")
    run = only((workdir / "runs" / "self-distill").iterdir())
    res = results(run)
    assert res["status"] == "completed" and res["role"] == "self-distilled" and res["mmd_kernel"] == "gaussian"
    assert res["distortions"] == {"shift": 2, "flip": True, "noise": 0.05, "erase": 0.5} and res["T"] == 2
    row = metrics(run)[-1]
    for term in ("loss", "ce_a", "ce_b", "sym_kl", "mmd"):
        assert row[term] > 0, term
    # the total is the weighted sum of the logged terms (each averaged over the epoch)
    total = row["ce_a"] + row["ce_b"] + 1.0 * row["sym_kl"] + 5e-4 * row["mmd"]
    assert abs(row["loss"] - total) < 1e-4 * total
    assert (run / "model.pt").is_file() and (run / "checkpoints" / "last.pt").is_file()
    assert "sym_kl=" in (run / "self-distill.log").read_text()


def test_mutual_saves_each_student_and_their_ensemble(kdrun, workdir):
    kdrun("mutual", *QUICK, *LENET, "mutual.students=3")
    run = only((workdir / "runs" / "mutual").iterdir())
    top = results(run)
    assert top["role"] == "mutual ensemble" and top["n_students"] == 3 and len(top["students"]) == 3
    row = metrics(run)[-1]
    for i in range(3):
        assert row[f"ce_{i}"] > 0 and row[f"kl_{i}"] > 0
        student = results(run / f"student_{i}")
        assert student["role"] == "mutual student" and student["member"] == i
        assert student["test_errors"] == row["member_test_errors"][i] == top["students"][i]["test_errors"]
    assert row["test_errors"] == top["test_errors"]
    assert len({results(run / f"student_{i}")["test_errors"] for i in range(3)} | {0}) > 1
    # a student is an ordinary model.pt: evaluate reads it, and its numbers agree
    out = kdrun("evaluate", *QUICK, f"ckpt={run / 'student_1' / 'model.pt'}")
    assert f": {results(run / 'student_1')['test_errors']} test errors of 500" in out.stdout


def test_born_again_generations_chain_by_seed_and_are_ensembled(kdrun, workdir):
    kdrun("pipeline", "experiment=born_again", *QUICK, *LENET, "pipeline.seeds=[0,1]")
    run = only((workdir / "runs" / "pipeline").iterdir())
    assert not (run / "teacher").exists()  # no run needed the store's teacher: none was trained
    for g in (1, 2, 3):
        for seed in (0, 1):
            res = results(run / f"generation_{g}" / str(seed))
            parent = run / f"generation_{g - 1}" / str(seed) / "model.pt"
            assert res["seed"] == seed and res["teacher_ckpt"] == str(parent)
            assert res["teacher_sha256"] == sha256_file(parent) and res["teacher"] == "lenet5"
    for seed in (0, 1):
        ens = results(run / "generations_ensemble" / str(seed))
        assert [m["run"] for m in ens["members"]] == ["generation_1", "generation_2", "generation_3"]
        assert [m["test_errors"] for m in ens["members"]] == [
            results(run / f"generation_{g}" / str(seed))["test_errors"] for g in (1, 2, 3)]
    report = (run / "report.md").read_text()
    for name in ("generation_0", "generation_3", "generations_ensemble"):
        assert f"| {name} " in report, name


def test_a_student_checkpoint_teaches_its_twin_without_naming_its_architecture(kdrun, workdir):
    kdrun("self-distill", *QUICK, *LENET)
    ckpt = only((workdir / "runs" / "self-distill").iterdir()) / "model.pt"
    # teacher= is left at its default (an MLP): the checkpoint's recorded architecture is used
    kdrun("distill", *QUICK, *LENET, f"teacher_ckpt={ckpt}", "transfer.augment=true", "T=1", "alpha=1")
    res = results(only((workdir / "runs" / "distill").iterdir()))
    assert res["teacher"] == "lenet5" and res["teacher_sha256"] == sha256_file(ckpt) and res["status"] == "completed"
