"""`kdrun pipeline`: train the teacher (if missing, and if a run needs it) -> cache its soft targets ->
each named run of `pipeline.runs` -> each ensemble of `pipeline.ensembles` -> a report of them all.

Every run is exactly a `kdrun distill` (or the command its first word names: `self-distill`, `mutual`)
with the pipeline's command line plus that run's overrides; `teacher_ckpt=@NAME` distils from the model
of an earlier run (the same seed's), which chains born-again generations. Presets (conf/experiment/)
define the runs."""

import difflib
import importlib
import logging
from pathlib import Path

from omegaconf import OmegaConf

from kdrun import report, resume, store
from kdrun.commands import distill, soft_targets, train
from kdrun.commands.common import check_inputs, fold_recipe_overrides, save_config
from kdrun.errors import KdrunError, first_line
from kdrun.io import write_json
from kdrun.run_config import run_config
from kdrun.validate import validate

log = logging.getLogger("kdrun")
NOT_PASSED_ON = ("pipeline.", "paper", "hydra.")  # pipeline-only keys, not a run's
RESERVED = ("teacher", "soft_targets")  # the pipeline's own folders
RUN_COMMANDS = ("distill", "self-distill", "mutual")  # what a run's first word may name


def _command_of(name, extra):
    """A run's command (its first word when that is not an override; else distill) and its overrides."""
    if extra and "=" not in extra[0]:
        if extra[0] not in RUN_COMMANDS:
            close = difflib.get_close_matches(extra[0], RUN_COMMANDS, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise KdrunError(f"pipeline.runs.{name}: '{extra[0]}' is not a command a run can be{hint}; choose from: "
                             f"{', '.join(RUN_COMMANDS)}")
        return extra[0], list(extra[1:])
    return "distill", list(extra)


def student_runs(cfg, overrides):
    """[(name, command, [(command-line overrides, run overrides) per job])]: each run's overrides after
    the command line's, its sweeps expanded, once per seed of `pipeline.seeds`."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from kdrun.launch import expand_alpha_shorthand, sweep_points

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
        command, extra = _command_of(name, list(extra))
        own = expand_alpha_shorthand(extra) + (["seed=" + ",".join(str(s) for s in seeds)] if seeds else [])
        try:
            parsed = OverridesParser.create().parse_overrides(base + own)
            jobs = sweep_points(parsed)
        except Exception as e:
            raise KdrunError(f"pipeline.runs.{name}: {first_line(e)}") from None
        runs.append((name, command, [(job, job[len(base):]) for job in jobs]))
    return runs


def compose_run(name, job, command="distill"):
    """The config of one run: `kdrun <command>` composed with these overrides, and the recipes of both
    roles folded in (so the teacher it looks for is the pipeline's). The run's own recipe overrides win
    over a top-level epochs/lr/batch_size from the command line."""
    from hydra import compose
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from kdrun.launch import COMMANDS, explain

    words, own = job
    try:
        cfg = compose(config_name=COMMANDS[command][0], overrides=list(words))
    except Exception as e:
        raise KdrunError(f"pipeline.runs.{name}: {explain(e, command)}") from None
    cfg = fold_recipe_overrides(cfg, ["teacher", "student"])
    for o in OverridesParser.create().parse_overrides(list(own)):
        if o.key_or_group.startswith(("student.recipe.", "teacher.recipe.")):
            OmegaConf.update(cfg, o.key_or_group, o.value())
    return cfg


def _reference(run_cfg):
    """The run an `@NAME` teacher_ckpt names, else None."""
    ckpt = run_cfg.get("teacher_ckpt")
    return ckpt[1:] if isinstance(ckpt, str) and ckpt.startswith("@") else None


def needs_store_teacher(command, run_cfg):
    return command == "distill" and distill.uses_teacher(run_cfg) and not run_cfg.teacher_ckpt


def preflight(cfg, overrides=()):
    transfer = check_inputs(cfg)
    train.preflight(cfg)
    key = store.teacher_key(fold_recipe_overrides(cfg, ["teacher", "student"]), cfg.teacher_seed)
    earlier = {}  # run name -> (command, the seed of each of its jobs)
    for name, command, jobs in student_runs(cfg, overrides):
        seeds = []
        for job in jobs:
            run_cfg = compose_run(name, job, command)
            try:
                validate(run_cfg)
                _check_run(command, run_cfg, transfer, earlier)
            except KdrunError as e:
                raise KdrunError(f"pipeline.runs.{name}: {e}") from None
            seeds.append(run_cfg.seed)
            if not needs_store_teacher(command, run_cfg):
                continue
            same = (run_cfg.workdir, run_cfg.teacher_seed) == (cfg.workdir, cfg.teacher_seed)
            if store.teacher_key(run_cfg, run_cfg.teacher_seed) != key or not same:
                raise KdrunError(f"pipeline.runs.{name} changes the teacher; every run distils from the pipeline's")
        earlier[name] = (command, seeds)
    for name, members in (cfg.pipeline.get("ensembles") or {}).items():
        if not OmegaConf.is_list(members) or len(members) < 2 or any(m not in earlier for m in members):
            raise KdrunError(f"pipeline.ensembles.{name} must list 2 or more runs of pipeline.runs "
                             f"({', '.join(earlier)}), got {members!r}")
        for m in members:
            _one_model_per_seed(f"pipeline.ensembles.{name}", m, *earlier[m])
        if len({frozenset(earlier[m][1]) for m in members}) != 1:
            raise KdrunError(f"pipeline.ensembles.{name}: its runs have different seeds; they pair up seed by seed")
        if name in earlier or name in RESERVED:
            raise KdrunError(f"pipeline.ensembles.{name}: the name is taken")


def _check_run(command, run_cfg, transfer, earlier):
    """What `kdrun <command>`'s preflight checks, except the teacher an @NAME run will make."""
    ref = _reference(run_cfg)
    if ref is not None:
        if ref not in earlier:
            raise KdrunError(f"teacher_ckpt=@{ref} names no earlier run (earlier: {', '.join(earlier) or 'none'})")
        _one_model_per_seed(f"teacher_ckpt=@{ref}", ref, *earlier[ref])
        if run_cfg.seed not in earlier[ref][1]:
            raise KdrunError(f"teacher_ckpt=@{ref}: {ref} has no job with seed {run_cfg.seed} (it has "
                             f"{', '.join(map(str, earlier[ref][1]))}); a job distils from the same seed's model")
    if command != "distill":
        _module(command).preflight(run_cfg)
        return
    distill.check_student(run_cfg, transfer["n"])
    distill.check_val_size(run_cfg, transfer["n"])


def _one_model_per_seed(where, name, command, seeds):
    """Runs pair up seed by seed: a run another names must have one model per seed."""
    if command == "mutual":
        raise KdrunError(f"{where}: {name} is a mutual run, with one model per student; name a model.pt instead")
    if len(set(seeds)) != len(seeds):
        raise KdrunError(f"{where}: {name} has several jobs with the same seed ({', '.join(map(str, seeds))}); "
                         "runs pair up seed by seed")


def _module(command):
    from kdrun.launch import COMMANDS

    return importlib.import_module(COMMANDS[command][1])


def run(cfg, run_dir):
    from hydra.core.hydra_config import HydraConfig

    hc = HydraConfig.get()
    overrides = list(hc.overrides.task)
    # epochs/lr/batch_size typed on the command line apply to every model the pipeline trains
    cfg = fold_recipe_overrides(cfg, ["teacher", "student"])
    save_config(cfg, run_dir)
    runs = student_runs(cfg, overrides)
    if any(needs_store_teacher(command, compose_run(name, job, command)) for name, command, jobs in runs for job in jobs):
        teacher_cfg = cfg.copy()
        teacher_cfg.seed = cfg.teacher_seed
        teacher_cfg.command = "train"  # its results are a teacher's, whoever trains it
        train.run(teacher_cfg, run_dir / "teacher")
        soft_targets.run(cfg, run_dir / "soft_targets")
    done, models = [], {}  # run name -> {seed: its model.pt}
    for name, command, jobs in runs:
        models[name] = {}
        for i, job in enumerate(jobs):
            where = run_dir / name if len(jobs) == 1 else run_dir / name / str(i)
            log.info("pipeline: %s -> %s (kdrun %s %s)", name, where, command, " ".join(job[0]))
            done.append(str(where))
            run_cfg = compose_run(name, job, command)
            ref = _reference(run_cfg)
            if ref is not None:
                run_cfg.teacher_ckpt = models[ref][run_cfg.seed]
            if cfg.resume and resume.status(where) == "completed":
                log.info("pipeline: %s is complete; kept", where)
            else:
                _module(command).run(run_cfg, where, label=name)
            models[name][run_cfg.seed] = str(where / "model.pt")
    for name, members in (cfg.pipeline.get("ensembles") or {}).items():
        seeds = sorted(models[members[0]])
        for i, seed in enumerate(seeds):
            where = run_dir / name if len(seeds) == 1 else run_dir / name / str(i)
            done.append(str(where))
            evaluate_ensemble(cfg, where, name, list(members), [models[m][seed] for m in members])
    paper = OmegaConf.to_container(cfg.paper, resolve=True) if cfg.get("paper") else None
    preset = hc.runtime.choices.get("experiment")
    title = f"kdrun pipeline experiment={preset}" if preset else f"kdrun pipeline: {cfg.dataset.name}"
    text, rows = report.write([run_dir], run_dir, title=title, paper=paper)
    write_json(run_dir / "results.json", {"command": "pipeline", "status": "completed", "runs": done,
                                          "report": str(run_dir / "report.md"), "config": run_config(cfg)})
    print(f"\n{text}")
    return rows


def evaluate_ensemble(cfg, where, name, runs, paths):
    """The ensemble of these runs' models (one job of each) as its own row of the report: the mean of
    their probabilities, evaluated on the test set."""
    from kdrun.commands.common import load_data, load_model, n_params, resolve_device
    from kdrun.ensemble import Ensemble
    from kdrun.io import read_json
    from kdrun.loop import evaluate

    data = load_data(cfg, resolve_device(cfg.device))
    models = [load_model(p, data, cfg.dataset.name, None, None, role="member")[0] for p in paths]
    measured = evaluate(Ensemble(models, "arithmetic").eval(), data.test)
    member_results = [read_json(Path(p).with_name("results.json")) for p in paths]
    results = {"command": "ensemble", "status": "completed", "role": "ensemble", "label": name, "dataset": cfg.dataset.name,
               "student": member_results[0].get("student"), "teacher": None, "teacher_key": None, "T": None, "alpha": None,
               **{k: member_results[0].get(k) for k in ("seed", "epochs", "batch_size", "jitter")},
               "n_params": sum(map(n_params, models)), "n_train": len(data.train),
               "train_accuracy": None, "run_dir": str(where),
               **{k: measured[k] for k in ("test_errors", "n_test", "test_accuracy")},
               "members": [{"run": r, "model": p, "test_errors": e}
                           for r, p, e in zip(runs, paths, measured["member_test_errors"])],
               "config": run_config(cfg)}
    write_json(Path(where) / "results.json", results)
    log.info("pipeline: ensemble %s of %s: %d test errors (members: %s)", name, ", ".join(runs), results["test_errors"],
             ", ".join(map(str, measured["member_test_errors"])))
    return results
