"""`kdrun report` groups runs by their whole resolved config (results.json `config`) but the seed, paths
and timing, shows every config key that tells rows apart, and compares two rows seed by seed."""

import json
import math

import pytest
from hydra import compose, initialize_config_dir
from scipy import stats

from kdrun import report
from kdrun.compare import paired, select
from kdrun.configs import conf_dir
from kdrun.errors import KdrunError
from kdrun.io import write_json
from kdrun.report import collect, render, summarise
from kdrun.run_config import run_config


def config(command, *overrides):
    """The `config` a run of `kdrun <command> overrides` records (composed here, nothing trained)."""
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        return run_config(compose(config_name=command.replace("-", "_"), overrides=list(overrides)))


def result(where, name, cfg, errors, role=None, **fields):
    base = {"command": cfg["command"], "status": "completed", "dataset": cfg["dataset"]["name"], "epochs": 1,
            "n_test": 100, "run_dir": str(where / name), "seed": cfg["seed"], "test_errors": errors,
            "test_accuracy": 1 - errors / 100, "config": cfg}
    if cfg["command"] == "distill":
        base.update(student=cfg["student"]["name"], T=cfg["T"], alpha=cfg["alpha"], loss="HintonKD",
                    teacher_key=None if cfg["alpha"] == 0 else "k1", teacher=None if cfg["alpha"] == 0 else "mlp30")
    if role:
        base["role"] = role
    write_json(where / name / "results.json", {**base, **fields})


def header(text):
    return [c.strip() for c in text.splitlines()[2].strip("|").split("|")]


def anneal_sweep(where, errors=((30, 32), (40, 45))):
    for start, errs in zip((2, 50), errors):
        for seed, e in enumerate(errs):
            cfg = config("distill", "temperature=anneal", f"temperature.start={start}", f"seed={seed}")
            result(where, f"start{start}_seed{seed}", cfg, e)


def test_two_anneal_starts_are_two_rows_with_a_temperature_start_column(tmp_path):
    anneal_sweep(tmp_path / "sweep")
    rows, _ = summarise(collect([tmp_path / "sweep"]))
    assert [(r["setup"]["temperature.start"], r["n"], r["errors_mean"]) for r in rows] == [(2, 2, 31), (50, 2, 42.5)]
    text = render(rows, [], "t")
    columns = header(text)
    # the one key that differs is a column; its copy inside the loss (loss.temperature.start) and the
    # keys repeating T and alpha are not
    assert columns[:6] == ["model", "teacher", "student", "T", "alpha", "temperature.start"]
    assert "loss.temperature.start" not in columns and "temperature.value" not in columns
    lines = text.splitlines()
    assert "| 2 " in lines[4] and "31.0 ± 1.4" in lines[4] and "| 50 " in lines[5] and "42.5 ± 3.5" in lines[5]


def test_the_old_hand_kept_keys_merged_the_two_anneal_runs(tmp_path):
    """What the report did before `config`: results.json without it are grouped by their fields, which
    do not name temperature.start. Older results still report, in rows of their own."""
    anneal_sweep(tmp_path / "sweep")
    for f in (tmp_path / "sweep").rglob("results.json"):
        r = json.loads(f.read_text())
        old = {**{k: v for k, v in r.items() if k != "config"}, "run_dir": str(tmp_path / "old" / f.parent.name)}
        write_json(tmp_path / "old" / f.parent.name / "results.json", old)
    old, _ = summarise(collect([tmp_path / "old"]))
    assert [(r["n"], r["errors_mean"]) for r in old] == [(4, 36.75)] and old[0]["setup"] == {}
    both, _ = summarise(collect([tmp_path / "old", tmp_path / "sweep"]))
    assert sorted(r["n"] for r in both) == [2, 2, 4]  # old and new never share a row
    assert "| distilled " in render(old, [], "t")


def test_seeds_paths_and_choices_do_not_split_rows_or_make_columns(tmp_path):
    where = tmp_path / "runs"
    for seed in (0, 1):  # the self-distill loss holds the seed (loss.seed: ${seed}); teacher_ckpt is a path
        cfg = config("self-distill", f"seed={seed}", f"teacher_ckpt={tmp_path}/gen{seed}/model.pt")
        result(where, f"sd{seed}", cfg, 20 + seed, role="self-distilled", student="mlp800", T=3.0, alpha=None)
    for student in ("cnn", "lenet5"):
        cfg = config("distill", f"student={student}", "alpha=0")
        result(where, f"alone_{student}", cfg, 50)
    rows, _ = summarise(collect([where]))
    assert sorted((r["role"], r["n"]) for r in rows) == [("self-distilled", 2), ("student alone", 1),
                                                        ("student alone", 1)]
    columns = header(render(rows, [], "t"))
    # student=cnn and student=lenet5 differ in every student.* key: the student column says it all
    assert not any(c.startswith("student.") for c in columns), columns
    assert "loss.seed" not in columns and "teacher_ckpt" not in columns


def test_a_student_alone_is_one_row_whatever_T_and_the_gap_is_recovered(tmp_path):
    where = tmp_path / "sweep"
    write_json(tmp_path / "teachers" / "k1" / "teacher.json", {"results": {
        "command": "train", "status": "completed", "dataset": "fashion_mnist", "teacher": "mlp30", "epochs": 1,
        "n_test": 100, "test_errors": 10, "test_accuracy": 0.9, "seed": 0, "teacher_key": "k1",
        "run_dir": "/elsewhere/train", "config": config("train", "teacher=mlp30")}})
    for T in (2, 8):
        for seed, (alone, taught) in enumerate(((40, 30), (44, 34))):
            result(where, f"a{T}{seed}", config("distill", f"T={T}", "alpha=0", f"seed={seed}"), alone)
            result(where, f"d{T}{seed}", config("distill", f"T={T}", f"seed={seed}"), taught + T,
                   teacher_ckpt=str(tmp_path / "teachers" / "k1" / "model.pt"))
    rows, _ = summarise(collect([where]))
    by = {(r["role"], r["T"]): r for r in rows}
    assert set(by) == {("teacher", None), ("student alone", None), ("distilled", 2), ("distilled", 8)}
    assert by[("student alone", None)]["n"] == 4
    assert by[("distilled", 8)]["gap_recovered"] == pytest.approx((42 - 40) / (42 - 10))
    assert header(render(rows, [], "t"))[:6] == ["model", "teacher", "student", "T", "alpha", "test errors"]


def test_mutual_rows_keep_their_students_and_ensemble(tmp_path):
    where = tmp_path / "mutual"
    for seed in (0, 1):
        cfg = config("mutual", f"seed={seed}")
        fields = dict(student="mlp800", T=1.0, alpha=None, loss="MutualLearning", teacher=None, teacher_key=None)
        result(where, f"m{seed}", cfg, 30 + seed, role="mutual ensemble", **fields)
        for i in (0, 1):
            result(where / f"m{seed}", f"student_{i}", cfg, 35 + i + seed, role="mutual student", member=i, **fields)
    rows, _ = summarise(collect([where]))
    assert [(r["role"], r["n"], r["errors_mean"]) for r in rows] == [("mutual student", 4, 36), ("mutual ensemble", 2, 30.5)]


def write_paired(where):
    """Two labelled runs over four seeds with known test errors: A - B = -2, -3, 0, -3."""
    for label, errs, T in (("kd_T2", (10, 12, 15, 11), 2), ("kd_T8", (12, 15, 15, 14), 8)):
        for seed, e in enumerate(errs):
            result(where, f"{label}_{seed}", config("distill", f"T={T}", f"seed={seed}"), e, label=label)


def test_compare_is_a_paired_t_test_over_seeds(tmp_path):
    write_paired(tmp_path / "runs")
    rows, _ = summarise(collect([tmp_path / "runs"]))
    c = paired(rows, "kd_T2", "kd_T8")
    assert c["seeds"] == [0, 1, 2, 3] and c["diffs"] == [-2, -3, 0, -3]
    assert c["mean"] == -2 and c["std"] == pytest.approx(math.sqrt(2))  # sample std of the differences
    t = -2 / (math.sqrt(2) / math.sqrt(4))
    assert c["t"] == pytest.approx(t)
    assert c["p"] == pytest.approx(2 * stats.t.sf(abs(t), df=3))  # two-sided, 3 degrees of freedom
    assert c["p"] == pytest.approx(0.06628, abs=1e-5)
    # the same rows picked by a field, a config key, or several terms
    assert paired(rows, "T=2", "T=8")["diffs"] == paired(rows, "distilled,T=2", "loss.temperature.value=8")["diffs"]
    assert paired(rows, "T=8", "T=2")["mean"] == 2


def test_compare_selectors_and_their_errors(tmp_path):
    anneal_sweep(tmp_path / "sweep")
    for seed, e in enumerate((33, 36)):
        result(tmp_path / "sweep", f"constant{seed}", config("distill", f"seed={seed}"), e)
    rows, _ = summarise(collect([tmp_path / "sweep"]))
    assert select(rows, "temperature=constant")["errors_mean"] == 34.5  # a group and its option
    assert select(rows, "temperature=anneal,temperature.start=50")["errors_mean"] == 42.5
    with pytest.raises(KdrunError, match=r"^--compare: 'temperature=anneal' matches 2 rows \(temperature.start=2; "
                                          r"temperature.start=50\); add KEY=VALUE terms"):
        select(rows, "temperature=anneal")
    with pytest.raises(KdrunError, match=r"^--compare: no row matches 'T=3'; rows: distilled$"):
        select(rows, "T=3")
    result(tmp_path / "sweep", "lonely", config("distill", "T=7", "seed=5"), 1)
    rows, _ = summarise(collect([tmp_path / "sweep"]))
    with pytest.raises(KdrunError, match=r"^--compare: 'temperature=constant' matches 2 rows \(T=4.0; T=7\)"):
        select(rows, "temperature=constant")
    with pytest.raises(KdrunError, match=r"^--compare: 'T=7' and 'temperature=constant,T=4' share 0 seed\(s\) \(none\); "
                                          "a paired comparison needs 2 or more$"):
        paired(rows, "T=7", "temperature=constant,T=4")


def test_report_compare_prints_and_writes_the_comparison(tmp_path, capsys):
    write_paired(tmp_path / "runs")
    assert report.main([str(tmp_path / "runs"), "--out", str(tmp_path / "out"), "--compare", "kd_T2", "kd_T8"]) == 0
    written = (tmp_path / "out" / "report.md").read_text()
    assert "## Paired comparison: kd_T2 vs kd_T8" in written
    assert "Mean difference A - B: -2 test errors, std 1.41 over 4 seeds; paired t-test t = -2.828, p = 0.06628" in written
    assert "| 2    | 15       | 15       | +0    |" in written
    assert written in capsys.readouterr().out
    with pytest.raises(KdrunError, match="no row matches 'kd_T3'"):
        report.main([str(tmp_path / "runs"), "--out", str(tmp_path / "out2"), "--compare", "kd_T2", "kd_T3"])
    assert not (tmp_path / "out2").exists()  # a bad selector stops before anything is written


@pytest.mark.slow
def test_a_real_anneal_sweep_reports_two_rows(kdrun, workdir):
    tiny = ["dataset=fashion_mnist", "dataset.limit=300", "dataset.test_limit=100", "progress=false",
            "teacher=mlp30", "teacher.recipe.epochs=1"]
    kdrun("train", *tiny)
    kdrun("distill", *tiny, "student=mlp30", "epochs=1", "-m", "temperature=anneal", "temperature.start=2,50")
    sweep = next((workdir / "sweeps" / "distill").iterdir())
    res = json.loads((sweep / "0" / "results.json").read_text())
    assert res["config"]["temperature"]["start"] == 2 and not {"workdir", "device", "progress"} & set(res["config"])
    out = kdrun("report", str(sweep)).stdout
    table = out[out.index("| model"):]
    distilled = [line.split("|") for line in table.splitlines() if line.startswith("| distilled")]
    column = header("\n\n" + table).index("temperature.start") + 1
    assert [cells[column].strip() for cells in distilled] == ["2", "50"]
    assert all(cells[header("\n\n" + table).index("n") + 1].strip() == "1" for cells in distilled)


def test_runs_of_one_setup_from_two_versions_of_a_preset_are_one_row(tmp_path):
    """A preset's run list and reference numbers (pipeline.*, paper.*) travel in every run's config, but
    what a run computes does not depend on them: a run composed from an edited preset joins its seeds."""
    for seed, (runs, e) in enumerate(((["alpha=0.5"], 30), (["alpha=0.5", "T=2,4"], 34))):
        cfg = config("distill", f"seed={seed}")
        cfg["pipeline"] = {"runs": {"distilled": runs}}
        cfg["paper"] = {"source": f"version {seed}"}
        result(tmp_path, f"seed{seed}", cfg, e)
    cfg = config("distill", "seed=2", "alpha=0.3")
    result(tmp_path, "other", cfg, 50)
    rows, _ = summarise(collect([tmp_path]))
    assert sorted((r["n"], r["errors_mean"]) for r in rows) == [(1, 50), (2, 32)]
    assert not [c for c in header(render(rows, [], "t")) if c.startswith(("pipeline", "paper"))]
