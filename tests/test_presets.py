"""The paper's experiments as presets (`kdrun pipeline experiment=NAME`), end to end on small data."""

import csv
import json
import statistics
from pathlib import Path

import pytest
import torch

from conftest import QUICK, write_mnist_like
from kdrun.models.build import build_model
from kdrun.data.batches import DeviceData
from kdrun.data.sources import load_split, stratified_subset
from kdrun.loop import evaluate

TINY = [*QUICK, "epochs=1"]


def only(paths):
    paths = list(paths)
    assert len(paths) == 1, paths
    return paths[0]


def results(run_dir):
    return json.loads((Path(run_dir) / "results.json").read_text())


def pipeline_dir(workdir):
    return only((workdir / "runs" / "pipeline").iterdir())


def test_hinton_mnist_on_mnist_shaped_idx_files(kdrun, workdir, tmp_path):
    data = tmp_path / "mnist_data"
    write_mnist_like(data / "MNIST" / "raw", n_train=400, n_test=100)
    out = kdrun("pipeline", "experiment=hinton_mnist", "epochs=2", "progress=false", extra_env={"KDRUN_DATA": str(data)})
    run = pipeline_dir(workdir)
    # three seeds, and each seed's students learn from that seed's own teacher
    teachers = {s: results(run / "teacher" / f"mlp1200_seed{s}") for s in (0, 1, 2)}
    alone = [results(run / "student_alone" / str(i)) for i in range(3)]
    jittered = [results(run / "student_alone_jitter" / str(i)) for i in range(3)]
    distilled = [results(run / "distilled" / str(i)) for i in range(3)]
    for s, teacher in teachers.items():
        assert (teacher["dataset"], teacher["teacher"], teacher["n_train"], teacher["seed"]) == ("mnist", "mlp1200", 400, s)
    assert [r["seed"] for r in distilled] == [0, 1, 2] and all(r["teacher_key"] is None for r in alone)
    # the control beside the paper's runs: the student alone with the teacher's 2-pixel jitter
    assert [(r["seed"], r["jitter"], r["alpha"], r["teacher_key"]) for r in jittered] == [(s, 2, 0, None) for s in (0, 1, 2)]
    assert all(r["jitter"] == 0 for r in alone + distilled)
    for r in distilled:
        assert (r["student"], r["T"], r["alpha"]) == ("mlp800", 20, 0.9)
        assert r["teacher_key"] == teachers[r["seed"]]["teacher_key"]
    assert len({r["teacher_key"] for r in distilled}) == 3
    # the report sets the paper's 67 / 146 / 74 beside the mean ± std of the three seeds
    report = (run / "report.md").read_text()
    assert report.strip() in out.stdout
    def mean_std(runs):
        errors = [r["test_errors"] for r in runs]
        return f"{statistics.fmean(errors):.1f} ± {statistics.stdev(errors):.1f}"

    measured = {"teacher": list(teachers.values()), "student_alone": alone, "distilled": distilled}
    jitter_line = only(x for x in report.splitlines() if x.startswith("| student_alone_jitter "))
    assert f"| {mean_std(jittered)} " in jitter_line
    for name, paper in (("teacher", 67), ("student_alone", 146), ("distilled", 74)):
        line = only(x for x in report.splitlines() if x.startswith(f"| {name} ") and f"| {paper} " in x)
        assert line.split("|")[-2].strip() == mean_std(measured[name]), name
    assert "trains 300 epochs of SGD" in report


def test_omit_class_trains_without_the_class_and_corrects_its_bias(kdrun, workdir, data_dir):
    kdrun("pipeline", "experiment=omit_class", *TINY, "transfer.val_size=200")
    run = pipeline_dir(workdir)
    res = results(run / "omit_3")
    # 100 images of each class; 20 of each go to validation; the 80 remaining 3s are left out
    assert res["transfer_set"] == "without 3" and res["n_val"] == 200 and res["n_train"] == 1000 - 200 - 80
    bias = res["bias_correction"]
    assert bias["classes"] == [3] and bias["n_val"] == 200 and bias["test_errors_before"] == res["test_errors"]
    assert bias["unseen_classes"] == [3] and bias["n_test_unseen"] == 50
    assert bias["val_errors_after"] <= bias["val_errors_before"]  # a shift of 0 was among those tried
    # the saved corrected model really makes the reported number of test errors
    corrected = torch.load(run / "omit_3" / "model_bias_corrected.pt", weights_only=True)
    plain = torch.load(run / "omit_3" / "model.pt", weights_only=True)
    delta = corrected["model"]["head.bias"] - plain["model"]["head.bias"]
    assert torch.allclose(delta, torch.nn.functional.one_hot(torch.tensor(3), 10) * bias["shift"], atol=1e-5)
    test = load_split(data_dir / "FashionMNIST" / "raw", "test")
    keep = stratified_subset(test.labels, 500, 0)
    test_data = DeviceData(test.images[keep], test.labels[keep], 0.2860, 0.3530, "cpu")
    for payload, expected in ((plain, bias["test_errors_before"]), (corrected, bias["test_errors_after"])):
        model = build_model(payload["arch"], 10)
        model.load_state_dict(payload["model"])
        assert evaluate(model.eval(), test_data)["test_errors"] == expected
    report = (run / "report.md").read_text()
    line = only(x for x in report.splitlines() if x.startswith("| omit_3 ") and "without 3" in x)
    assert f"| {bias['test_errors_after']:.1f} " in line and f"{bias['shift']:+.2f}" in line
    assert f"| {bias['test_errors_unseen_before']} -> {bias['test_errors_unseen_after']} of 50 " in line
    assert "tuned on a validation split carved from the training data" in report


def test_regulariser_runs_on_3_percent_with_and_without_labels(kdrun, workdir):
    kdrun("pipeline", "experiment=regulariser", *TINY, "pipeline.runs.alone_3pct=['alpha=0','transfer.fraction=0.03']",
          "pipeline.runs.distilled_3pct=['transfer.fraction=0.03']",
          "pipeline.runs.unlabeled_3pct=['alpha=1','transfer.fraction=0.03','transfer.labels=false']")
    run = pipeline_dir(workdir)
    assert sorted(p.name for p in run.iterdir() if (p / "results.json").is_file()) == [
        "alone_3pct", "distilled_3pct", "soft_targets", "student_alone", "teacher", "unlabeled_3pct"]  # no `distilled`
    alone, soft, unlabeled = (results(run / n) for n in ("alone_3pct", "distilled_3pct", "unlabeled_3pct"))
    assert alone["n_train"] == soft["n_train"] == unlabeled["n_train"] == 30  # 3% of 1000, stratified
    assert unlabeled["alpha"] == 1 and unlabeled["train_accuracy"] is None and unlabeled["labels"] is False
    metrics = [json.loads(x) for x in (run / "unlabeled_3pct" / "metrics.jsonl").read_text().splitlines()]
    assert "ce" not in metrics[0] and "kd_scaled" in metrics[0]
    table = list(csv.DictReader(open(run / "report.csv")))
    assert {r["label"] for r in table} == {"", "student_alone", "alone_3pct", "distilled_3pct", "unlabeled_3pct"}


def test_hinton_fashion_consistent_views_and_logit_matching(kdrun, workdir):
    kdrun("pipeline", "experiment=hinton_fashion", *TINY,
          "pipeline.runs.consistent_long=['transfer.augment=true','student.recipe.jitter=1','student.recipe.epochs=2']")
    run = pipeline_dir(workdir)
    consistent = results(run / "consistent")
    assert consistent["augment"] == "online teacher, 1px jitter" and consistent["jitter"] == 1
    # a run's own recipe overrides win over the command line's epochs=1
    assert (consistent["epochs"], results(run / "consistent_long")["epochs"]) == (1, 2)
    assert "soft_targets" not in consistent  # the online teacher uses no cache
    assert results(run / "distilled")["soft_targets"]
    assert results(run / "logit_matching")["loss"] == "LogitMatching"
    report = (run / "report.md").read_text()
    for name in ("student_alone_jitter", "consistent", "consistent_long", "logit_matching"):
        assert any(x.startswith(f"| {name} ") for x in report.splitlines()), name
    assert (run / "report.png").stat().st_size > 1000


def test_student_size_sweeps_students_and_temperatures(kdrun, workdir):
    kdrun("pipeline", "experiment=student_size", *TINY, "teacher=mlp30", "pipeline.runs.distilled=['student=mlp30,mlp300','T=2,20']")
    run = pipeline_dir(workdir)
    jobs = sorted((run / "distilled").iterdir())
    assert len(jobs) == 4 and len(list((run / "student_alone").iterdir())) == 3
    seen = {(results(j)["student"], results(j)["T"]) for j in jobs}
    assert seen == {("mlp30", 2), ("mlp30", 20), ("mlp300", 2), ("mlp300", 20)}


@pytest.mark.parametrize("preset", ["ensemble_fashion", "ensemble_mnist"])
def test_ensemble_preset_distils_on_the_images_its_members_never_saw(kdrun, workdir, tmp_path, preset):
    if preset == "ensemble_mnist":  # MNIST-shaped files the test writes, as a user's clone has no MNIST
        write_mnist_like(tmp_path / "mnist_data" / "MNIST" / "raw", n_train=1000, n_test=500)
        data = ["dataset.test_limit=500", "progress=false", f"data_dir={tmp_path / 'mnist_data'}"]
    else:
        data = QUICK
    out = kdrun("pipeline", f"experiment={preset}", *data, "epochs=1", "teacher.members=[0,1]",
                "teacher.recipe.val_size=200", "pipeline.seeds=[0,1]")
    run = pipeline_dir(workdir)
    ensemble = results(run / "teacher" / "ensemble")
    assert ensemble["teacher"] == "ensemble(arithmetic, 2x mlp1200_adamw)"
    member = [results(run / "teacher" / "ensemble" / f"member_{i}") for i in (0, 1)]
    assert [(m["seed"], m["n_train"], m["n_val"]) for m in member] == [(0, 800, 200), (1, 800, 200)]
    one = results(run / "teacher" / "ensemble_2")  # the from-one control: member 0, the ensemble's own file
    assert one["label"] == "one member" and [m["key"] for m in one["members"]] == [ensemble["members"][0]["key"]]
    runs = {name: [results(run / name / str(i)) for i in (0, 1)]
            for name in ("same_size_alone", "same_size_distilled", "same_size_from_one", "same_size_on_seen")}
    for r in runs["same_size_distilled"]:  # every training image, no label: all it knows of labels is the ensemble's
        assert (r["n_train"], r["labels"], r["alpha"], r["teacher_key"]) == (1000, False, 1.0, ensemble["teacher_key"])
    assert [r["teacher_key"] for r in runs["same_size_from_one"]] == [one["teacher_key"]] * 2
    # the members' own 800 images, validated on the 200 they held out
    assert [(r["n_train"], r["n_val"], r["teacher_key"]) for r in runs["same_size_on_seen"]] == \
        [(800, 200, ensemble["teacher_key"])] * 2
    assert [(r["n_train"], r["n_val"], r["teacher_key"]) for r in runs["same_size_alone"]] == [(800, 200, None)] * 2
    # the model alone at seed 0 is member 0: the same network, recipe, seed and 800 images
    assert runs["same_size_alone"][0]["test_errors"] == member[0]["test_errors"]
    rows = {r["label"]: r for r in csv.DictReader(open(run / "report.csv"))}
    assert float(rows["ensemble"]["errors_mean"]) == ensemble["test_errors"]
    assert rows["same_size_from_one"]["gain_kept"] == ""  # distilled from one member: there is no ensemble gain
    for b in ("same_size_alone", "same_size_from_one", "same_size_on_seen"):
        a = "same_size_distilled"
        section = out.stdout.split(f"## Paired comparison: {a} vs {b}")[1].split("##")[0]
        for seed in (0, 1):
            ea, eb = runs[a][seed]["test_errors"], runs[b][seed]["test_errors"]
            assert f"| {seed}    | {ea} " in section and f"| {ea - eb:+d} " in section
    paper_row = next(line for line in out.stdout.splitlines() if line.startswith("| ensemble ") and "61.1%" in line)
    assert paper_row.rstrip("| ").endswith(f"| {ensemble['test_errors']:.1f} ± 0.0")  # the ensemble of 2, not the one of 1


def test_every_paper_preset_composes_its_runs_and_states_how_it_differs():
    from hydra import compose, initialize_config_dir

    from kdrun.cli import conf_dir
    from kdrun.commands.pipeline import compose_run, student_runs

    expected = {"hinton_mnist": 3 * 3, "hinton_fashion": 6, "student_size": 3 + 3 * 8, "omit_class": 2,
                "only_classes": 2, "regulariser": 4, "ensemble_fashion": 12,
                "ensemble_mnist": 12}
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        for name, n_jobs in expected.items():
            cfg = compose(config_name="pipeline", overrides=[f"experiment={name}"])
            runs = student_runs(cfg, [f"experiment={name}"])
            assert sum(len(jobs) for _, _, jobs in runs) == n_jobs, name
            assert cfg.paper.source.startswith("Hinton et al. 2015") and cfg.paper.differences, name
            for run_name, command, jobs in runs:
                run_cfg = compose_run(run_name, jobs[0], command)
                assert run_cfg.teacher.name == cfg.teacher.name and command == run_cfg.command == "distill"
        for name in ("student_size", "omit_class", "only_classes", "regulariser"):  # section 3 on MNIST says so
            said = " ".join(compose(config_name="pipeline", overrides=[f"experiment={name}", "dataset=mnist"]).paper.differences)
            assert "the teacher cnn" in said and "mnist" in said and "Fashion" not in said, name
        omit = compose_run("omit_3", student_runs(compose(config_name="pipeline", overrides=["experiment=omit_class"]),
                                                  ["experiment=omit_class"])[1][2][0])
        assert (list(omit.transfer.exclude_classes), omit.transfer.val_size, omit.transfer.bias_correction) == ([3], 5000, True)


def test_self_teaching_fashion_compares_every_family_against_the_network_alone(kdrun, workdir):
    kdrun("pipeline", "experiment=self_teaching_fashion", "student=lenet5", *TINY, "pipeline.seeds=[0]")
    run = pipeline_dir(workdir)
    rows = {r["label"] + ("" if r["role"] != "mutual ensemble" else " ensemble"): r
            for r in csv.DictReader(open(run / "report.csv"))}
    assert set(rows) == {"generation_0", "generation_1", "generation_2", "self_distilled", "mutual", "mutual ensemble",
                         "generations_ensemble"}
    alone = results(run / "generation_0")
    for name, row in rows.items():
        assert row["dataset"] == "fashion_mnist" and row["student"] == "lenet5" and row["n_train"] == "1000", name
        if name != "generation_0":  # each measured against the same network alone
            assert float(row["vs_alone"]) == float(row["errors_mean"]) - alone["test_errors"], name
    sd = results(run / "self_distilled")
    assert sd["distortions"]["shift"] == 1 and sd["jitter"] == 0 and rows["self_distilled"]["views"] == "2 views: 1px shift"
    assert float(rows["mutual"]["n"]) == 2  # both students of the one seed
    assert "| mutual ensemble " in (run / "report.md").read_text()
