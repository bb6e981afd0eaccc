"""`kdrun pipeline`: train the teacher (if missing) -> soft targets -> student alone -> distilled student,
then print a table of the three."""

from kdrun import store
from kdrun.commands import distill, soft_targets, train
from kdrun.commands.common import check_buildable, check_inputs, fold_recipe_overrides, save_config
from kdrun.io import atomic_write, write_json
from kdrun.report import markdown_table

COLUMNS = [("model", "role"), ("arch", "arch"), ("T", "T"), ("alpha", "alpha"), ("test errors", "test_errors"),
           ("n test", "n_test"), ("test acc", "test_accuracy"), ("params", "n_params"), ("wall s", "wall_s")]


def preflight(cfg, overrides=()):
    check_inputs(cfg)
    cfg = fold_recipe_overrides(cfg, ["teacher", "student"])
    check_buildable(cfg, ["teacher"])
    distill.check_student(cfg)


def run(cfg, run_dir):
    # epochs/lr/batch_size typed on the command line apply to every model the pipeline trains
    cfg = fold_recipe_overrides(cfg, ["teacher", "student"])
    save_config(cfg, run_dir)
    teacher_cfg = cfg.copy()
    teacher_cfg.seed = cfg.teacher_seed
    teacher = train.run(teacher_cfg, run_dir / "teacher")
    soft_targets.run(cfg, run_dir / "soft_targets")
    alone_cfg = cfg.copy()
    alone_cfg.alpha = 0.0
    alone_cfg.alpha_schedule = {"_target_": "kdrun.schedules.Constant", "value": 0.0}  # no teacher, whatever the schedule
    alone = distill.run(alone_cfg, run_dir / "student_alone")
    distilled = distill.run(cfg, run_dir / "distilled")
    rows = [
        {**teacher, "role": "teacher", "arch": cfg.teacher.name, "T": None, "alpha": None},
        {**alone, "role": "student alone", "arch": cfg.student.name, "T": None},
        {**distilled, "role": "distilled", "arch": cfg.student.name},
    ]
    table = markdown_table(rows, COLUMNS)
    gap = alone["test_errors"] - teacher["test_errors"]
    kept = (alone["test_errors"] - distilled["test_errors"]) / gap if gap > 0 else None
    summary = f"gap recovered: {kept:.1%}" if kept is not None else "gap recovered: n/a (teacher not better)"
    report = f"# kdrun pipeline: {cfg.dataset.name}\n\n{table}\n\n{summary}\n"
    atomic_write(run_dir / "report.md", lambda f: f.write(report), mode="w")
    write_json(run_dir / "results.json", {"command": "pipeline", "status": "completed", "rows": rows,
                                          "gap_recovered": kept, "teacher_key": store.teacher_key(cfg, cfg.teacher_seed)})
    print(f"\n{table}\n{summary}\n")
    return rows
