"""`kdrun pipeline`: train the teacher (if missing) -> cache its soft targets -> each named student
run of `pipeline.runs` -> a report of them all. Every student run is exactly a `kdrun distill` with
the pipeline's command line plus that run's overrides; presets (conf/experiment/) define the runs."""

import logging

from omegaconf import OmegaConf

from kdrun import report, store
from kdrun.commands import distill, soft_targets, train
from kdrun.commands.common import check_inputs, fold_recipe_overrides, save_config
from kdrun.errors import KdrunError, first_line
from kdrun.io import write_json
from kdrun.validate import validate

log = logging.getLogger("kdrun")
NOT_PASSED_ON = ("pipeline.", "paper", "hydra.")  # pipeline-only keys, not a distill run's
RESERVED = ("teacher", "soft_targets")  # the pipeline's own folders


def student_runs(cfg, overrides):
    """[(name, [(command-line overrides, run overrides) per job])]: each run's overrides after the
    command line's, its sweeps expanded, once per seed of `pipeline.seeds`."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from kdrun.cli import expand_alpha_shorthand, sweep_points

    base = [o for o in overrides if not o.partition("=")[0].lstrip("+~").startswith(NOT_PASSED_ON)]
    seeds = cfg.pipeline.seeds
    runs = []
    for name, extra in cfg.pipeline.runs.items():
        if extra is None:  # a preset drops a default run with `name: null`
            continue
        if name in RESERVED:
            raise KdrunError(f"pipeline.runs.{name}: a run cannot be named {' or '.join(RESERVED)}")
        if not OmegaConf.is_list(extra) or not all(isinstance(o, str) for o in extra):
            raise KdrunError(f"pipeline.runs.{name} must be a list of overrides like ['alpha=0', 'T=2,4'], got {extra!r}")
        own = expand_alpha_shorthand(list(extra)) + (["seed=" + ",".join(str(s) for s in seeds)] if seeds else [])
        try:
            parsed = OverridesParser.create().parse_overrides(base + own)
            jobs = sweep_points(parsed)
        except Exception as e:
            raise KdrunError(f"pipeline.runs.{name}: {first_line(e)}") from None
        runs.append((name, [(job, job[len(base):]) for job in jobs]))
    return runs


def compose_run(name, job):
    """The config of one student run: `kdrun distill` composed with these overrides, and the recipes
    of both roles folded in (so the teacher it looks for is the pipeline's). The run's own recipe
    overrides win over a top-level epochs/lr/batch_size from the command line."""
    from hydra import compose
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from kdrun.cli import explain

    words, own = job
    try:
        cfg = compose(config_name="distill", overrides=list(words))
    except Exception as e:
        raise KdrunError(f"pipeline.runs.{name}: {explain(e, 'distill')}") from None
    cfg = fold_recipe_overrides(cfg, ["teacher", "student"])
    for o in OverridesParser.create().parse_overrides(list(own)):
        if o.key_or_group.startswith(("student.recipe.", "teacher.recipe.")):
            OmegaConf.update(cfg, o.key_or_group, o.value())
    return cfg


def preflight(cfg, overrides=()):
    transfer = check_inputs(cfg)
    train.preflight(cfg)
    key = store.teacher_key(fold_recipe_overrides(cfg, ["teacher", "student"]), cfg.teacher_seed)
    for name, jobs in student_runs(cfg, overrides):
        for job in jobs:
            run_cfg = compose_run(name, job)
            try:
                validate(run_cfg)
                distill.check_student(run_cfg)
                distill.check_val_size(run_cfg, transfer["n"])
            except KdrunError as e:
                raise KdrunError(f"pipeline.runs.{name}: {e}") from None
            same = (run_cfg.teacher_ckpt, run_cfg.workdir, run_cfg.teacher_seed) == (cfg.teacher_ckpt, cfg.workdir, cfg.teacher_seed)
            if store.teacher_key(run_cfg, run_cfg.teacher_seed) != key or not same:
                raise KdrunError(f"pipeline.runs.{name} changes the teacher; every run distils from the pipeline's")


def run(cfg, run_dir):
    from hydra.core.hydra_config import HydraConfig

    hc = HydraConfig.get()
    overrides = list(hc.overrides.task)
    # epochs/lr/batch_size typed on the command line apply to every model the pipeline trains
    cfg = fold_recipe_overrides(cfg, ["teacher", "student"])
    save_config(cfg, run_dir)
    teacher_cfg = cfg.copy()
    teacher_cfg.seed = cfg.teacher_seed
    teacher_cfg.command = "train"  # its results are a teacher's, whoever trains it
    taught = train.run(teacher_cfg, run_dir / "teacher")
    soft_targets.run(cfg, run_dir / "soft_targets")
    done = []
    for name, jobs in student_runs(cfg, overrides):
        for i, job in enumerate(jobs):
            where = run_dir / name if len(jobs) == 1 else run_dir / name / str(i)
            log.info("pipeline: %s -> %s (kdrun distill %s)", name, where, " ".join(job[0]))
            done.append(str(where))
            distill.run(compose_run(name, job), where, label=name)
    paper = OmegaConf.to_container(cfg.paper, resolve=True) if cfg.get("paper") else None
    preset = hc.runtime.choices.get("experiment")
    title = f"kdrun pipeline experiment={preset}" if preset else f"kdrun pipeline: {cfg.dataset.name}"
    text, rows = report.write([run_dir], run_dir, title=title, paper=paper)
    write_json(run_dir / "results.json", {"command": "pipeline", "status": "completed", "runs": done,
                                          "report": str(run_dir / "report.md"), "teacher_key": taught["teacher_key"]})
    print(f"\n{text}")
    return rows
