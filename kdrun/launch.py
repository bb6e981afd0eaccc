"""Composing, checking and running one command's Hydra app: the command table, the checks every job of
a request passes before Hydra creates any run directory (each point of a sweep), the one-line
explanation of any error, and the Hydra app itself. The dispatcher (kdrun.cli) and the commands that
start other commands (pipeline, resume) use it."""

import difflib
import importlib
import logging
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

from kdrun import configs, distributed, interrupt, tracking
from kdrun.configs import conf_dir, group_options
from kdrun.errors import KdrunError, StorageError, first_line

COMMANDS = {  # command word -> (primary config, module)
    "train": ("train", "kdrun.commands.train"),
    "soft-targets": ("soft_targets", "kdrun.commands.soft_targets"),
    "distill": ("distill", "kdrun.commands.distill"),
    "pipeline": ("pipeline", "kdrun.commands.pipeline"),
    "evaluate": ("evaluate", "kdrun.commands.evaluate"),
    "specialists": ("specialists", "kdrun.commands.specialists"),
    "self-distill": ("self_distill", "kdrun.commands.self_distill"),
    "mutual": ("mutual", "kdrun.commands.mutual"),
}
# schedule group -> the top-level value it schedules (T and alpha are what users type)
SCHEDULE_GROUPS = {"temperature": "T", "alpha_schedule": "alpha"}
TORCHRUN_COMMANDS = ("distill",)  # what runs data-parallel under torchrun (see kdrun.distributed)
NOT_CHOSEN_DIRECTLY = {"model": "teacher=NAME or student=NAME", "recipe": "teacher.recipe.KEY=VALUE or epochs=N"}

log = logging.getLogger("kdrun")


def expand_alpha_shorthand(overrides):
    """`alpha=anneal` picks the alpha schedule: Hydra cannot have a group and a key both named alpha."""
    options = group_options("alpha_schedule")
    out = []
    for item in overrides:
        key, _, value = item.partition("=")
        if key == "alpha" and value and all(v in options for v in value.split(",")):
            item = f"alpha_schedule={value}"
        out.append(item)
    return out


def _check_group_choices(parsed):
    groups = set(configs.groups())
    for o in parsed:
        key = o.key_or_group
        if key not in groups or o.package is not None or o.is_delete():
            continue
        if key in NOT_CHOSEN_DIRECTLY:
            raise KdrunError(f"{key} is not chosen directly; use {NOT_CHOSEN_DIRECTLY[key]}")
        values = list(o.sweep_string_iterator()) if o.is_sweep_override() else [o.value()]
        values = [x for v in values for x in (v if isinstance(v, list) else [v])]  # logger=[tensorboard,mlflow]
        options = group_options(key)
        for v in values:
            if v in options or v is None:
                continue
            if key in SCHEDULE_GROUPS and not isinstance(v, str):
                name = SCHEDULE_GROUPS[key]
                raise KdrunError(f"{key} picks a schedule ({', '.join(options)}); to set the value use {name}={v}")
            raise KdrunError(unknown_option(key, v))


def unknown_option(group, value):
    options = group_options(group)
    close = difflib.get_close_matches(str(value), options, n=1)
    hint = f" (did you mean {close[0]}?)" if close else ""
    return f"unknown {group} '{value}'{hint}; choose from: {', '.join(options)}"


def _jobs(parsed, overrides, multirun):
    """Override lists of every job a request will run (one, or each point of a sweep)."""
    if not multirun:
        for o in parsed:
            if o.is_sweep_override():
                raise KdrunError(f"{o.input_line} is a sweep; add -m to run it: kdrun ... -m {o.input_line}")
        return [overrides]
    return sweep_points(parsed)


def sweep_points(parsed):
    """The override list of each point of a sweep (Hydra's basic sweeper, every combination, in order)."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper

    return [job for batch in BasicSweeper.split_arguments(parsed, None) for job in batch]


def check_torchrun(command, multirun=False, cfg=None):
    """Under torchrun (WORLD_SIZE > 1), refuse what cannot run data-parallel, before any process joins
    the process group or writes anything: another command, a sweep (-m or fused), a resume. (kdrun train
    would deadlock: rank 0 trains a teacher holding the store's lock that the other ranks wait for.)"""
    if distributed.world_size() == 1:
        return
    if command not in TORCHRUN_COMMANDS:
        allowed = " and ".join(f"kdrun {c}" for c in TORCHRUN_COMMANDS)
        raise KdrunError(f"kdrun {command} does not run under torchrun (only {allowed} does); run it as one process")
    if multirun:
        raise KdrunError("-m (a sweep) does not run under torchrun; start one torchrun per point of the sweep")
    if cfg is None:
        return
    from kdrun.sweep import is_fused

    if cfg.get("resume"):
        raise KdrunError("resume=true does not run under torchrun; resume the run as one process: kdrun resume RUN_DIR")
    if is_fused(cfg):
        raise KdrunError("sweep.fused=true does not run under torchrun; run the fused sweep as one process")


def preflight(command, overrides, multirun):
    """Compose and check every job before Hydra writes anything."""
    from hydra import compose, initialize_config_dir
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from kdrun.sweep import points
    from kdrun.validate import validate

    check_torchrun(command, multirun)
    config_name, module_name = COMMANDS[command]
    parsed = OverridesParser.create().parse_overrides(overrides)
    _check_group_choices(parsed)
    jobs = _jobs(parsed, overrides, multirun)
    module = importlib.import_module(module_name)
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3", job_name=config_name):
        for job in jobs:
            for cfg in points(compose(config_name=config_name, overrides=job)):  # a fused sweep's students
                validate(cfg)
                tracking.check(cfg)
                check_torchrun(command, cfg=cfg)
                if hasattr(module, "preflight"):
                    module.preflight(cfg, job)
    return len(jobs)


# ---------------------------------------------------------------- errors


def explain(exc, command=None):
    """One line for the user from any exception kdrun or Hydra raises."""
    if isinstance(exc, KdrunError):
        return str(exc)
    text = str(exc).strip()
    where = f"kdrun {command}" if command else "kdrun"
    m = re.search(r"Could not override '([^']+)'\.\s*(To append|Key '.*' is not in struct)", text)
    if m:
        return f"unknown key '{m.group(1)}' for {where} (`{where} --help` lists the keys)"
    m = re.search(r"Could not override '([^']+)'\.\s*No match in the defaults list", text)
    if m:
        return f"'{m.group(1)}' cannot be chosen in {where}"
    m = re.search(r"Could not find '([^']+)/([^']+)'", text)
    if m:
        return unknown_option(m.group(1), m.group(2))
    if _is_user_error(exc):
        return first_line(exc)
    if isinstance(exc, OSError) and exc.strerror:  # a full disk, a read-only or forbidden folder
        return f"{exc.strerror}: {exc.filename}" if exc.filename else exc.strerror
    return f"{type(exc).__name__}: {first_line(exc)} (set KDRUN_DEBUG=1 for the traceback)"


def _record_failure(run_dir, cfg, message, status="failed"):
    from kdrun.io import write_json

    try:
        write_json(Path(run_dir) / "results.json", {
            "command": cfg.get("command"), "status": status, "error": message, "run_dir": str(run_dir),
        })
    except OSError:
        pass  # the error being reported matters more than this record


# ---------------------------------------------------------------- running


def run_hydra(command, argv):
    import hydra
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    config_name, module_name = COMMANDS[command]
    failures = []  # a single run's exception, kept here so that Hydra prints nothing of its own

    def task(cfg):
        module = importlib.import_module(module_name)  # torch loads here, not for --help
        hc = HydraConfig.get()
        run_dir = Path(hc.runtime.output_dir)
        interrupt.set_resume_dir(hc.sweep.dir if hc.mode == RunMode.MULTIRUN else run_dir)
        try:
            if distributed.world_size() > 1:
                from kdrun.devices import resolve_device

                distributed.init(resolve_device(cfg.device))
            with tracking.job(cfg, run_dir):  # the trackers `logger=...` chose (none by default)
                return module.run(cfg, run_dir)
        except interrupt.Interrupted as e:
            _record_failure(run_dir, cfg, f"interrupted by {e}", status="interrupted")
            raise
        except Exception as e:
            message = explain(e, command)
            _record_failure(run_dir, cfg, message)
            if hc.mode == RunMode.MULTIRUN:  # the sweep goes on; its summary reports the failure
                log.error("job %s failed: %s", run_dir, message)
            else:
                failures.append(e)

    from kdrun.callbacks import LAST_SWEEP

    LAST_SWEEP.clear()
    app = hydra.main(version_base="1.3", config_path=str(conf_dir()), config_name=config_name)(task)
    scratch = None
    if not distributed.is_main():  # under torchrun only rank 0 writes: the others' run dirs are private
        scratch = tempfile.mkdtemp(prefix=f"kdrun-rank{distributed.rank()}-")
        argv = [*argv, f"hydra.run.dir='{scratch}'", "hydra.output_subdir=null", "hydra.job_logging.root.level=WARNING"]
    saved = sys.argv
    sys.argv = ["kdrun", *argv]
    os.environ["HYDRA_FULL_ERROR"] = "1"  # let exceptions reach `main`, which prints one line
    try:
        app()
    finally:
        sys.argv = saved
        distributed.close()
        if scratch:
            shutil.rmtree(scratch, ignore_errors=True)
    if failures:
        raise failures[0]
    failed = [row for row in LAST_SWEEP if row["status"] != "completed"]
    if failed:
        raise KdrunError(f"{len(failed)} sweep job(s) failed; first: {failed[0].get('error') or failed[0]['status']}")


def _is_user_error(exc):
    if isinstance(exc, StorageError):
        return False
    return isinstance(exc, KdrunError) or type(exc).__module__.startswith(("hydra", "omegaconf"))
