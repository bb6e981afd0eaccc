"""`kdrun resume DIR`: finish a run, a pipeline or a sweep that was stopped (a signal, kill -9, a
pre-empted node). A run starts again with its saved overrides in its own directory and each training
continues from its checkpoint; a sweep's finished jobs are left alone."""

import logging
from pathlib import Path

from omegaconf import OmegaConf

from kdrun import configs, interrupt
from kdrun.errors import KdrunError, first_line
from kdrun.io import read_json

log = logging.getLogger("kdrun")
FINISHED = ("completed", "reused")
SET_BY_RESUME = ("resume", "workdir", "data_dir")  # keys this module sets on the resumed run's command line


def main(argv):
    if len(argv) != 1 or argv[0].startswith("-"):
        raise KdrunError("usage: kdrun resume RUN_DIR|SWEEP_DIR")
    target = Path(argv[0])
    if (target / "multirun.yaml").is_file():
        return resume_sweep(target)
    if (target / ".hydra" / "config.yaml").is_file():
        return resume_run(target)
    raise KdrunError(f"{target} is not a kdrun run or sweep directory (it has no .hydra/config.yaml or multirun.yaml)")


def status(run_dir):
    path = Path(run_dir) / "results.json"
    return read_json(path).get("status") if path.is_file() else None


def resume_run(run_dir):
    if status(run_dir) in FINISHED:
        print(f"kdrun: {run_dir} is complete; nothing to resume")
        return 0
    saved = OmegaConf.load(run_dir / ".hydra" / "config.yaml")
    overrides = [str(o) for o in OmegaConf.load(run_dir / ".hydra" / "overrides.yaml")]
    if (run_dir / ".hydra" / "hydra.yaml").is_file():
        use_user_folders(OmegaConf.load(run_dir / ".hydra" / "hydra.yaml"))
    _run(saved.command, overrides, run_dir, _places(run_dir, saved))
    return 0


def resume_sweep(sweep_dir):
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from kdrun.launch import sweep_points
    from kdrun.report import write_sweep_summary

    saved = OmegaConf.load(sweep_dir / "multirun.yaml")
    use_user_folders(saved)
    if OmegaConf.to_container(saved.hydra.sweep)["subdir"] != "${hydra.job.num}":
        raise KdrunError(f"cannot resume {sweep_dir}: its jobs are not in numbered folders (hydra.sweep.subdir)")
    task = [str(o) for o in saved.hydra.overrides.task]
    jobs = sweep_points(OverridesParser.create().parse_overrides(task))
    places = _places(sweep_dir, saved)
    failed = []
    try:
        for num, job in enumerate(jobs):
            job_dir = sweep_dir / str(num)
            if status(job_dir) in FINISHED:
                log.info("resume: job %d (%s) is complete; left alone", num, " ".join(job))
                continue
            log.info("resume: job %d (%s) -> %s", num, " ".join(job), job_dir)
            try:
                _run(saved.command, job, job_dir, places)
            except Exception as e:  # recorded in the job's results.json; the sweep goes on, as in a multirun
                failed.append(f"job {num}: {first_line(e)}")
    except interrupt.Interrupted:
        interrupt.set_resume_dir(sweep_dir)  # the whole sweep, not the job that was running
        raise
    rows = write_sweep_summary(sweep_dir, task)
    if failed:
        raise KdrunError(f"{len(failed)} sweep job(s) failed; first: {failed[0]}")
    log.info("resume: %s: %d jobs complete", sweep_dir, sum(r["status"] in FINISHED for r in rows))
    return 0


def use_user_folders(saved):
    """The user's config folders the run was started with (its Hydra config's search path), then
    KDRUN_CONFIG_PATH's, so that its own configs compose again."""
    sources = OmegaConf.select(saved, "hydra.runtime.config_sources", default=None) or []
    folders = [f"{s.schema}://{s.path}" for s in sources if s.provider == "kdrun user folder"]
    configs.use(folders + configs.from_env())


def _places(target, saved):
    """workdir and data_dir as the run resolved them (its config.yaml, or a sweep job's), so that
    resuming from another shell or with other KDRUN_* variables finds the same store and data."""
    for config in [target / "config.yaml", *sorted(target.glob("*/config.yaml"))]:
        if config.is_file():
            resolved = OmegaConf.load(config)
            return {k: resolved[k] for k in ("workdir", "data_dir")}
    return {k: OmegaConf.select(saved, k, throw_on_resolution_failure=False) for k in ("workdir", "data_dir")}


def _run(command, overrides, run_dir, places):
    from kdrun.launch import run_hydra

    own = [o for o in overrides if o.partition("=")[0].lstrip("+~") not in SET_BY_RESUME]
    extra = [f"{k}={_quoted(v)}" for k, v in places.items()] + ["resume=true", f"hydra.run.dir={_quoted(run_dir)}"]
    if (run_dir / ".hydra").is_dir():
        extra.append("hydra.output_subdir=null")  # keep the overrides the run was started with
    run_hydra(command, own + extra)


def _quoted(value):
    return "'" + str(value).replace("\\", "\\\\").replace("'", "\\'") + "'"
