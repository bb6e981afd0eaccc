"""`kdrun pipeline`: train each teacher the runs distil from (if missing) -> cache its soft targets (if a
run reads them) -> each named run of `pipeline.runs` -> each ensemble of `pipeline.ensembles` -> a report
of them all.

Every run is exactly a `kdrun distill` (or the command its first word names: `self-distill`, `mutual`)
with the pipeline's command line plus that run's overrides; `teacher_ckpt=@NAME` distils from the model
of an earlier run (the same seed's), which chains born-again generations. A run may name its own
`teacher=`: the pipeline trains (or finds in the store) every distinct teacher once. `pipeline.include`
runs the runs of other presets too (a benchmark table of teacher -> student pairs), each in its own folder,
all in one report. Presets (conf/experiment/) define the runs."""

import difflib
import importlib
import logging
from dataclasses import dataclass
from pathlib import Path

from omegaconf import OmegaConf

from kdrun import compare, report, resume, store
from kdrun.commands import distill, soft_targets, teacher, train
from kdrun.data.loading import identify
from kdrun.errors import KdrunError, first_line
from kdrun.io import write_json
from kdrun.parts import fold_recipe_overrides, teacher_seed
from kdrun.preflight import check_inputs
from kdrun.run import save_config
from kdrun.run_config import run_config
from kdrun.validate import validate

log = logging.getLogger("kdrun")
NOT_PASSED_ON = ("pipeline.", "paper", "hydra.")  # pipeline-only keys, not a run's
RESERVED = ("teacher", "soft_targets")  # the pipeline's own folders
RUN_COMMANDS = ("distill", "self-distill", "mutual")  # what a run's first word may name


@dataclass
class Plan:
    """The runs of one preset: the pipeline's own (folder ""), or one of `pipeline.include` (its folder,
    the preset's name), with the pipeline config and command line they are composed from."""

    folder: str
    cfg: object
    overrides: list
    runs: list  # student_runs()

    def where(self, run_dir, name):
        return Path(run_dir) / self.folder / name if self.folder else Path(run_dir) / name


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
    seeds, only = cfg.pipeline.seeds, cfg.pipeline.get("only")
    runs = []
    for name, extra in cfg.pipeline.runs.items():
        if extra is None or (only is not None and name not in only):  # a preset drops a default run with `name: null`
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


def plans(cfg, overrides):
    """The pipeline's own runs, then those of each preset `pipeline.include` names, composed as
    `kdrun pipeline experiment=PRESET` with the rest of this command line."""
    from hydra import compose

    from kdrun.launch import explain

    out = [Plan("", cfg, list(overrides), student_runs(cfg, overrides))]
    rest = [o for o in overrides if o.partition("=")[0].lstrip("+~") not in ("experiment", "pipeline.include")]
    for preset in cfg.pipeline.get("include") or []:
        words = [*rest, f"experiment={preset}"]
        try:
            sub = compose(config_name="pipeline", overrides=words)
        except Exception as e:
            raise KdrunError(f"pipeline.include: {explain(e, 'pipeline')}") from None
        if sub.pipeline.get("include"):
            raise KdrunError(f"pipeline.include: {preset} includes presets itself; include those directly")
        if preset in cfg.pipeline.runs or preset in RESERVED:
            raise KdrunError(f"pipeline.include: {preset} is also the name of a run")
        sub = fold_recipe_overrides(sub, ["teacher", "student"])
        try:
            out.append(Plan(str(preset), sub, words, student_runs(sub, words)))
        except KdrunError as e:
            raise KdrunError(f"pipeline.include: {preset}: {e}") from None
    names = {name for plan in out for name, _, _ in plan.runs}
    unknown = [n for n in cfg.pipeline.get("only") or [] if n not in names]
    if unknown:
        known = sorted({n for plan in out for n, extra in plan.cfg.pipeline.runs.items() if extra is not None})
        raise KdrunError(f"pipeline.only: no run is named {unknown[0]} (runs: {', '.join(known)})")
    return out


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


def _as_teacher(run_cfg):
    """The `kdrun train` config of the teacher a run distils from: its own config, at teacher_seed."""
    cfg = run_cfg.copy()
    cfg.seed = teacher_seed(run_cfg)
    cfg.command = "train"  # its results are a teacher's, whoever trains it
    return cfg


def teachers(jobs):
    """The distinct store teachers of (command, run config) jobs, in order: {key: (kdrun train config,
    a run config that reads cached soft targets from it, or None)}."""
    from kdrun.commands.teaching import online

    found, data = {}, {}
    for command, run_cfg in jobs:
        if not needs_store_teacher(command, run_cfg):
            continue
        where = (OmegaConf.to_yaml(run_cfg.dataset), str(run_cfg.data_dir))  # its files are hashed once
        if where not in data:
            data[where] = identify(run_cfg)
        key = store.teacher_key(run_cfg, teacher_seed(run_cfg), data[where])
        teacher_cfg, cached = found.get(key, (_as_teacher(run_cfg), None))
        found[key] = (teacher_cfg, cached or (None if online(run_cfg) else run_cfg))
    return found


def teacher_folders(found):
    """teacher/ (and soft_targets/) for one teacher; teacher/NAME for several (NAME_seedN for a name
    that several of them share, one seed each; else NAME_2, ...)."""
    if len(found) == 1:
        return {key: "" for key in found}
    by_name = {}
    for key, (teacher_cfg, _) in found.items():
        by_name.setdefault(str(teacher_cfg.teacher.name), []).append((key, teacher_cfg.seed))
    folders = {}
    for name, entries in by_name.items():
        one_seed_each = len({seed for _, seed in entries}) == len(entries) > 1
        for i, (key, seed) in enumerate(entries):
            folders[key] = f"{name}_seed{seed}" if one_seed_each else name if i == 0 else f"{name}_{i + 1}"
    return folders


def preflight(cfg, overrides=()):
    transfer = check_inputs(cfg)
    train.preflight(cfg)
    jobs = []
    for plan in plans(fold_recipe_overrides(cfg, ["teacher", "student"]), overrides):
        where = f"pipeline.include: {plan.folder}: " if plan.folder else ""
        if plan.folder:
            transfer = check_inputs(plan.cfg)
        earlier = {}  # run name -> (command, the seed of each of its jobs)
        for name, command, runs in plan.runs:
            seeds = []
            for job in runs:
                try:
                    run_cfg = compose_run(name, job, command)
                except KdrunError as e:
                    raise KdrunError(f"{where}{e}") from None
                try:
                    validate(run_cfg)
                    _check_run(command, run_cfg, transfer, earlier, job[0])
                except KdrunError as e:
                    raise KdrunError(f"{where}pipeline.runs.{name}: {e}") from None
                seeds.append(run_cfg.seed)
                jobs.append((command, run_cfg))
            earlier[name] = (command, seeds)
        if plan.folder and plan.cfg.pipeline.get("ensembles"):
            raise KdrunError(f"pipeline.include: {plan.folder} has pipeline.ensembles, which an included preset "
                             "cannot have")
        _check_ensembles(plan.cfg, earlier)
        if not plan.folder:
            _check_compare(plan.cfg, [*earlier, *(plan.cfg.pipeline.get("ensembles") or {})])
    for teacher_cfg, _ in teachers(jobs).values():
        train.preflight(teacher_cfg)


def _check_ensembles(cfg, earlier):
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


def _check_compare(cfg, names):
    """pipeline.compare: [A, B] pairs whose every bare term names a run (or a role) of this pipeline."""
    for i, pair in enumerate(cfg.pipeline.get("compare") or []):
        where = f"pipeline.compare[{i}]"
        if not OmegaConf.is_list(pair) or len(pair) != 2 or not all(isinstance(p, str) and p.strip() for p in pair):
            raise KdrunError(f"{where} must be a pair of row selectors like [distilled, student_alone], got {pair!r}")
        for selector in pair:
            for term in compare.selector_terms(selector):
                if "=" not in term and term not in names and term not in report.ROLE_ORDER:
                    raise KdrunError(f"{where}: '{term}' names no run of this pipeline (runs: {', '.join(names)})")


def _check_run(command, run_cfg, transfer, earlier, words):
    """What `kdrun <command>`'s preflight checks, except the teachers the pipeline trains (missing from the
    store) or an @NAME run will make."""
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
    if run_cfg.teacher_ckpt and ref is None and distill.uses_teacher(run_cfg):
        teacher.check(run_cfg, transfer, words)
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
    steps = plans(cfg, overrides)
    composed = {(plan.folder, name, i): compose_run(name, job, command)
                for plan in steps for name, command, jobs in plan.runs for i, job in enumerate(jobs)}
    found = teachers([(command, composed[plan.folder, name, i]) for plan in steps for name, command, jobs in plan.runs
                      for i in range(len(jobs))])
    folders = teacher_folders(found)
    for key, (teacher_cfg, cached) in found.items():
        train.run(teacher_cfg, run_dir / "teacher" / folders[key])
        if cached is not None:
            soft_targets.run(cached, run_dir / "soft_targets" / folders[key])
    done = []
    for plan in steps:
        done += _run_plan(plan, run_dir, composed)
    paper = OmegaConf.to_container(cfg.paper, resolve=True) if cfg.get("paper") else None
    included = [plan for plan in steps if plan.folder]
    if included:
        paper = {**(paper or {}), "pairs": [_pair(plan) for plan in included]}
    preset = hc.runtime.choices.get("experiment")
    title = f"kdrun pipeline experiment={preset}" if preset else f"kdrun pipeline: {cfg.dataset.name}"
    order = list(dict.fromkeys(name for plan in steps for name, _, _ in plan.runs))
    comparisons = [tuple(pair) for pair in cfg.pipeline.get("compare") or []]
    text, rows = report.write([run_dir], run_dir, title=title, paper=paper, order=order, comparisons=comparisons)
    write_json(run_dir / "results.json", {"command": "pipeline", "status": "completed", "runs": done,
                                          "report": str(run_dir / "report.md"), "config": run_config(cfg)})
    print(f"\n{text}")
    return rows


def _pair(plan):
    """An included preset as a row of the report's table of pairs: its teacher and student, and its
    paper's numbers."""
    paper = OmegaConf.to_container(plan.cfg.paper, resolve=True) if plan.cfg.get("paper") else {}
    return {"preset": plan.folder, "teacher": plan.cfg.teacher.name, "student": plan.cfg.student.name,
            "rows": paper.get("rows") or []}


def _run_plan(plan, run_dir, composed):
    done, models = [], {}  # run name -> {seed: its model.pt}
    for name, command, jobs in plan.runs:
        models[name] = {}
        for i, job in enumerate(jobs):
            where = plan.where(run_dir, name) if len(jobs) == 1 else plan.where(run_dir, name) / str(i)
            log.info("pipeline: %s -> %s (kdrun %s %s)", name, where, command, " ".join(job[0]))
            done.append(str(where))
            run_cfg = composed[plan.folder, name, i]
            ref = _reference(run_cfg)
            if ref is not None:
                run_cfg.teacher_ckpt = models[ref][run_cfg.seed]
            if plan.cfg.resume and resume.status(where) == "completed":
                log.info("pipeline: %s is complete; kept", where)
            else:
                _module(command).run(run_cfg, where, label=name)
            models[name][run_cfg.seed] = str(where / "model.pt")
    for name, members in (plan.cfg.pipeline.get("ensembles") or {}).items():
        seeds = sorted(models[members[0]])
        for i, seed in enumerate(seeds):
            where = plan.where(run_dir, name) if len(seeds) == 1 else plan.where(run_dir, name) / str(i)
            done.append(str(where))
            evaluate_ensemble(plan.cfg, where, name, list(members), [models[m][seed] for m in members])
    return done


def evaluate_ensemble(cfg, where, name, runs, paths):
    """The ensemble of these runs' models (one job of each) as its own row of the report: the mean of
    their probabilities, evaluated on the test set."""
    from kdrun.data.loading import load_data
    from kdrun.devices import resolve_device
    from kdrun.model_files import load_model
    from kdrun.training import n_params
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
