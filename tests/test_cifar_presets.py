"""The CIFAR-100 benchmark presets (conf/experiment/cifar100_*.yaml): every one composes and passes the
pipeline's checks; the table (two of its pairs, two runs each) and one pair preset run end to end for one
epoch on a tiny CIFAR-100 the test writes; a bad preset gets one line and writes nothing."""

import json
import os
import shutil
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from conftest import kdrun_in_process
from kdrun import configs, launch, store
from kdrun.commands import pipeline
from kdrun.configs import conf_dir, group_options
from test_readers import write_cifar100_like

PRESETS = sorted(p.stem for p in (conf_dir() / "experiment").glob("cifar100_*.yaml"))
PAIRS = [p for p in PRESETS if p != "cifar100_table"]
PUBLISHED_PAIRS = {"resnet56 -> resnet20", "resnet110 -> resnet32", "resnet32x4 -> resnet8x4", "wrn_40_2 -> wrn_16_2",
                   "wrn_40_2 -> wrn_40_1", "vgg13 -> vgg8", "resnet32x4 -> shufflenetv2"}
# one optimiser step of one batch per model: 20 training images of the 20 superclasses, 10 test images
TINY = ["epochs=1", "batch_size=20", "dataset.reader.coarse=true", "dataset.num_classes=20", "dataset.limit=20",
        "dataset.test_limit=10", "device=cpu", "progress=false"]
TWO_PAIRS = ["experiment=cifar100_table", "pipeline.include=[cifar100_resnet56_resnet20,cifar100_resnet110_resnet32]",
             "pipeline.only=[student_alone,kd]"]


@pytest.fixture(scope="module")
def cifar100(tmp_path_factory):
    root = tmp_path_factory.mktemp("cifar100")
    write_cifar100_like(root / "cifar-100-python", n_train=60, n_test=20)
    return root


def kdrun_pipeline(args, data, work):
    env = {**os.environ, "KDRUN_WORKDIR": str(Path(work) / "work"), "KDRUN_DATA": str(data)}
    env.pop("KDRUN_DEBUG", None)
    Path(work).mkdir(parents=True, exist_ok=True)
    return kdrun_in_process(["pipeline", *args], env=env, cwd=work)


def runs_of(work):
    return sorted((Path(work) / "work" / "runs" / "pipeline").iterdir())


def composed_plans(words):
    """The plans (kdrun.commands.pipeline.Plan) of `kdrun pipeline WORDS`, and each job's run config."""
    configs.use([])
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
            plans = pipeline.plans(compose(config_name="pipeline", overrides=words), words)
            jobs = [(c, pipeline.compose_run(n, job, c)) for plan in plans for n, c, jobs in plan.runs for job in jobs]
    finally:
        GlobalHydra.instance().clear()
    return plans, jobs


@pytest.mark.parametrize("preset", PAIRS)
def test_every_pair_preset_composes_with_its_pair_on_the_benchmark_recipe(preset):
    (plan,), _ = composed_plans([f"experiment={preset}", "pipeline.only=[student_alone]"])
    cfg = plan.cfg
    assert preset == f"cifar100_{cfg.teacher.name}_{cfg.student.name}" and cfg.dataset.name == "cifar100"
    assert (cfg.T, cfg.alpha, cfg.transfer.augment) == (4.0, 0.9, True)
    lr = 0.01 if cfg.student.name == "shufflenetv2" else 0.05
    for role, want in (("teacher", 0.05), ("student", lr)):
        recipe = cfg[role].recipe
        assert (recipe.epochs, recipe.batch_size, recipe.jitter, recipe.flip, recipe.optimizer.lr) == (240, 64, 4, True, want)
    names = [name for name, extra in cfg.pipeline.runs.items() if extra is not None]
    assert names == ["student_alone", "kd", "kd_ls", "dkd", "dist", "crd", "fitnet", "at", "sp", "rkd"]
    assert [r["run"] for r in cfg.paper.rows][-2:] == (["kd", "best"] if preset != "cifar100_resnet32x4_resnet8x4"
                                                        else ["dkd", "best"])


def test_every_run_of_every_pair_passes_the_pipeline_checks(cifar100):
    """The whole table through the pipeline's preflight: each run composed, validated and its student,
    objective and teacher built on the meta device (the methods whose settings differ by pair; one
    pair's every run is checked by the end-to-end tests below)."""
    configs.use([])
    GlobalHydra.instance().clear()
    try:
        assert launch.preflight("pipeline", ["experiment=cifar100_table", "pipeline.only=[fitnet,at,sp]",
                                             f"data_dir={cifar100}", *TINY], False) == 1
    finally:
        GlobalHydra.instance().clear()


def test_the_table_trains_each_distinct_teacher_once(cifar100):
    """Seven pairs, five teachers: resnet32x4 and wrn_40_2 each teach two students."""
    plans, jobs = composed_plans(["experiment=cifar100_table", "pipeline.only=[kd]", f"data_dir={cifar100}"])
    found = pipeline.teachers(jobs)
    assert [plan.folder for plan in plans] == ["", *pipeline_order()]
    assert len(jobs) == 7
    assert [cfg.teacher.name for cfg, _ in found.values()] == ["resnet56", "resnet110", "resnet32x4", "wrn_40_2", "vgg13"]
    assert {key: store.teacher_key(cfg, cfg.seed) for key, (cfg, _) in found.items()} == {k: k for k in found}
    assert all(cached is None for _, cached in found.values())  # every run's teacher is online: no soft targets
    assert sorted(pipeline.teacher_folders(found).values()) == ["resnet110", "resnet32x4", "resnet56", "vgg13", "wrn_40_2"]


def pipeline_order():
    from omegaconf import OmegaConf

    return list(OmegaConf.load(conf_dir() / "experiment" / "cifar100_table.yaml").pipeline.include)


@pytest.fixture(scope="module")
def table(cifar100, tmp_path_factory):
    """`kdrun pipeline experiment=cifar100_table` on two of its pairs, each alone and by KD, one epoch."""
    work = tmp_path_factory.mktemp("table")
    proc = kdrun_pipeline([*TWO_PAIRS, *TINY], cifar100, work)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return work, proc


@pytest.mark.slow
def test_the_table_runs_two_pairs_and_reports_them_beside_the_published(table):
    work, proc = table
    run = runs_of(work)[-1]
    for pair in ("cifar100_resnet56_resnet20", "cifar100_resnet110_resnet32"):
        for name in ("student_alone", "kd"):
            results = json.loads((run / pair / name / "results.json").read_text())
            assert (results["status"], results["label"], results["n_train"], results["n_test"]) == ("completed", name, 20, 10)
    kd = json.loads((run / "cifar100_resnet110_resnet32" / "kd" / "results.json").read_text())
    assert (kd["teacher"], kd["student"], kd["augment"]) == ("resnet110", "resnet32", "online teacher, 4px jitter, flip")
    assert sorted(p.name for p in (run / "teacher").iterdir()) == ["resnet110", "resnet56"]
    assert not (run / "soft_targets").exists()
    report = (run / "report.md").read_text()
    assert report in proc.stdout
    section = report.split("### Teacher -> student pairs, top-1 %")[1].split("## Results")[0]
    header = next(line for line in section.splitlines() if line.startswith("| pair"))
    assert [c.strip() for c in header.strip("|").split("|")] == [
        "pair", "params T / S", "teacher", "student_alone", "kd", "published teacher", "published student_alone",
        "published kd", "published best"]  # no published dkd: these two pairs' presets give none
    lines = {line.split("|")[1].strip(): [c.strip() for c in line.strip("|").split("|")]
             for line in section.splitlines() if "->" in line and line.startswith("|")}
    assert set(lines) == {"resnet56 -> resnet20", "resnet110 -> resnet32"} <= PUBLISHED_PAIRS
    row = lines["resnet110 -> resnet32"]
    assert row[5:] == ["74.31", "71.14", "73.08", "74.32 (MLKD+LS)"]
    teacher = json.loads((run / "teacher" / "resnet110" / "results.json").read_text())
    alone = json.loads((run / "cifar100_resnet110_resnet32" / "student_alone" / "results.json").read_text())
    assert row[1] == f"{teacher['n_params'] / 1e6:.2f}M / {kd['n_params'] / 1e6:.2f}M"
    assert row[2:5] == [f"{100 * r['test_accuracy']:.2f}" for r in (teacher, alone, kd)]


@pytest.mark.slow
def test_a_pair_preset_finds_its_teacher_in_the_store_and_runs_every_logit_method(table, cifar100, tmp_path):
    use = tmp_path / "pair"
    shutil.copytree(table[0] / "work" / "teachers", use / "work" / "teachers")
    proc = kdrun_pipeline(["experiment=cifar100_resnet56_resnet20", "pipeline.only=[kd,dkd,dist,crd]", *TINY],
                          cifar100, use)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = runs_of(use)[-1]
    assert json.loads((run / "teacher" / "results.json").read_text())["status"] == "reused"
    losses = {name: json.loads((run / name / "results.json").read_text())["loss"] for name in ("kd", "dkd", "dist", "crd")}
    assert losses == {"kd": "HintonKD", "dkd": "DKD", "dist": "DIST", "crd": "CRD"}
    report = (run / "report.md").read_text()
    table = report.split("## Results")[0]
    assert "| run           | setup in the paper" in table and "paper: top-1 % (CIFAR-100 test set)" in table
    assert "here: top-1 % of 10 test images" in table
    kd = json.loads((run / "kd" / "results.json").read_text())
    kd_line = next(line for line in table.splitlines() if line.startswith("| kd "))
    assert [c.strip() for c in kd_line.strip("|").split("|")] == [
        "kd", "Hinton KD, T=4, 0.9 soft / 0.1 hard", "70.66", f"{100 * kd['test_accuracy']:.2f}"]


def bad_preset(tmp_path, text):
    folder = tmp_path / "myconf" / "experiment"
    folder.mkdir(parents=True)
    (folder / "cifar100_mine.yaml").write_text("# @package _global_\n" + text)
    return ["--config-dir", str(tmp_path / "myconf")]


def test_a_preset_naming_an_unknown_model_gets_one_line(tmp_path, cifar100):
    where = bad_preset(tmp_path, "defaults:\n  - override /teacher: resnet56\n  - override /student: resnet_20\n")
    proc = kdrun_pipeline([*where, "experiment=cifar100_mine", *TINY], cifar100, tmp_path)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr == (f"kdrun: error: unknown student 'resnet_20' (did you mean resnet20?); choose from: "
                           f"{', '.join(group_options('student'))}\n")
    assert not (tmp_path / "work").exists()


def test_an_included_pair_whose_run_names_an_unknown_teacher_gets_one_line(tmp_path, cifar100):
    where = bad_preset(tmp_path, "defaults:\n  - override /dataset: cifar100\npipeline:\n  runs:\n"
                                 "    kd: [teacher=resnet57, student=resnet20]\n")
    proc = kdrun_pipeline([*where, "experiment=cifar100_table", "pipeline.include=[cifar100_mine]", *TINY], cifar100,
                          tmp_path)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr == (f"kdrun: error: pipeline.include: cifar100_mine: pipeline.runs.kd: unknown teacher 'resnet57' "
                           f"(did you mean resnet56?); choose from: {', '.join(group_options('teacher'))}\n")
    assert not (tmp_path / "work").exists()


@pytest.mark.parametrize("args, message", [
    (["experiment=cifar100_resnet56_resnet20", "teacher_ckpt=/nowhere/resnet56.pt"],
     "pipeline.runs.kd: teacher checkpoint not found: /nowhere/resnet56.pt"),
    (["experiment=cifar100_table", "pipeline.include=[cifar100_resnet56_resnet20]", "teacher_ckpt=/nowhere/resnet56.pt"],
     "pipeline.include: cifar100_resnet56_resnet20: pipeline.runs.kd: teacher checkpoint not found: /nowhere/resnet56.pt"),
    (["experiment=cifar100_table", "pipeline.include=[cifar100_resnet56_resnet2]"],
     "pipeline.include: unknown experiment 'cifar100_resnet56_resnet2' (did you mean cifar100_resnet56_resnet20?); "
     "choose from: " + ", ".join(group_options("experiment"))),
    (["experiment=cifar100_table", "pipeline.include=[cifar100_table]"],
     "pipeline.include: cifar100_table includes presets itself; include those directly"),
    (["experiment=cifar100_resnet56_resnet20", "pipeline.only=[kd,kdd]"],
     "pipeline.only: no run is named kdd (runs: at, crd, dist, dkd, fitnet, kd, kd_ls, rkd, sp, student_alone)"),
])
def test_a_pair_whose_teacher_cannot_be_found_and_other_bad_tables_get_one_line(tmp_path, cifar100, args, message):
    proc = kdrun_pipeline([*args, *TINY], cifar100, tmp_path)
    assert (proc.returncode, proc.stdout, proc.stderr) == (2, "", f"kdrun: error: {message}\n")
    assert not (tmp_path / "work").exists()


def _row(role, name, teacher, student, accuracy, key=None, n_params=1_000_000, n=1, errors_std=0.0):
    return {"role": role, "name": name, "teacher": teacher, "student": student, "teacher_keys": {key},
            "n_params": n_params, "accuracy": accuracy, "n": n, "errors_std": errors_std,
            "n_test": 200, "T": None, "errors": "-"}


def test_the_pairs_section_has_a_line_per_measured_pair_in_run_order_with_the_published_beside():
    from kdrun.report import pairs_section

    rows = [_row("teacher", "teacher", "resnet56", None, 0.7, key="a", n_params=861_620),
            _row("teacher", "teacher", "resnet110", None, 0.75, key="b"),
            _row("student alone", "student_alone", None, "resnet20", 0.6, n_params=278_324),
            _row("distilled", "kd", "resnet56", "resnet20", 0.655, key="a", n=3, errors_std=2.0),
            _row("distilled", "dkd", "resnet56", "resnet20", 0.66, key="a"),
            _row("distilled", "kd", "resnet110", "resnet32", 0.7, key="b")]
    pairs = [{"teacher": "resnet56", "student": "resnet20",
              "rows": [{"run": "teacher", "accuracy": 72.34}, {"run": "kd", "accuracy": 70.66},
                       {"run": "best", "method": "MLKD+LS", "accuracy": 72.33}]},
             {"teacher": "vgg13", "student": "vgg8", "rows": [{"run": "dkd", "accuracy": 74.0}]}]
    text = pairs_section(rows, pairs, order=["student_alone", "kd", "dkd"])
    table = [[c.strip() for c in line.strip("|").split("|")] for line in text.splitlines() if line.startswith("|")]
    assert table[0] == ["pair", "params T / S", "teacher", "student_alone", "kd", "dkd", "published teacher",
                        "published kd", "published best", "published dkd"]
    assert table[2:] == [["resnet56 -> resnet20", "0.86M / 0.28M", "70.00", "60.00", "65.50 ± 1.00", "66.00", "72.34",
                          "70.66", "72.33 (MLKD+LS)", "-"]]  # vgg13 -> vgg8: nothing measured; resnet110: no paper pair
    assert "on 200 test images" in text


@pytest.mark.slow
def test_the_short_cifar10_table_runs_its_four_students_with_the_teacher_online(tmp_path):
    """experiment=cifar10_short end to end on a tiny CIFAR-10 the test writes: the teacher once, the
    student alone and three distilled students on the cropped and flipped batches, one report."""
    from conftest import write_cifar_like

    write_cifar_like(tmp_path / "data" / "cifar-10-batches-py", n_per_batch=10)
    proc = kdrun_pipeline(["experiment=cifar10_short", "epochs=1", "batch_size=20", "dataset.limit=20",
                           "dataset.test_limit=10", "device=cpu", "progress=false"], tmp_path / "data", tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = runs_of(tmp_path)[-1]
    results = {name: json.loads((run / name / "results.json").read_text()) for name in ("student_alone", "kd", "dkd", "dist")}
    assert {name: r["loss"] for name, r in results.items() if name != "student_alone"} == {
        "kd": "HintonKD", "dkd": "DKD", "dist": "DIST"}
    assert {r["augment"] for name, r in results.items() if name != "student_alone"} == {"online teacher, 4px jitter, flip"}
    assert {(r["student"], r["n_train"], r["n_test"]) for r in results.values()} == {("resnet8", 20, 10)}
    assert {r["teacher"] for name, r in results.items() if name != "student_alone"} == {"resnet20"}
    assert "gap recovered" in (run / "report.md").read_text()


@pytest.mark.slow
@pytest.mark.parametrize("preset", [p for p in PAIRS if p not in ("cifar100_resnet56_resnet20", "cifar100_resnet110_resnet32")])
def test_every_other_pair_preset_trains_its_teacher_and_a_student_for_one_epoch(preset, cifar100, tmp_path):
    """The table's test runs two pairs and the pair test resnet56 -> resnet20: each other pair once here,
    its teacher trained by the preset, its student alone and by KD."""
    proc = kdrun_pipeline([f"experiment={preset}", "pipeline.only=[student_alone,kd]", *TINY], cifar100, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = runs_of(tmp_path)[-1]
    results = {name: json.loads((run / name / "results.json").read_text()) for name in ("teacher", "student_alone", "kd")}
    assert {name: r["status"] for name, r in results.items()} == {"teacher": "completed", "student_alone": "completed",
                                                                  "kd": "completed"}
    pair = f"{results['kd']['teacher']}_{results['kd']['student']}"
    assert f"cifar100_{pair}" == preset  # each preset is named after its pair
