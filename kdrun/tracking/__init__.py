"""Experiment tracking: the trackers `logger=...` chose (conf/logger/), fed by the Recorder and the CLI.

A Hydra job is one tracked run (`job`); a Recorder in a folder below the job's (a pipeline's runs, a
specialist) is a child run of it; a sweep is a parent run (`sweep_started`/`sweep_ended`, from the sweep
callback) whose jobs are its children, found through `tracking.json` in the sweep dir (so that jobs in
other processes find it too). Only rank 0 tracks under torchrun.

A tracker (kdrun.tracking.tensorboard, kdrun.tracking.mlflow, or any `_target_` with the same methods)
has `start(run_dir, name, tags, parent) -> run id`, `config(run, config)` (once per run: the resolved
config the run's config.yaml records), `resumed_at(run, epoch)`, `metrics(run, values, step)`,
`finish(run, files, status, tags)` and `close()`. Every call goes through `Trackers`:
a tracker that raises costs one warning line and is off for the rest of the process; the run goes on.
This module imports no tracking library: each tracker imports its own when it first needs it."""

import contextlib
import importlib
import importlib.util
import json
import logging
import math
import os
from pathlib import Path

from omegaconf import OmegaConf

from kdrun import distributed
from kdrun.errors import KdrunError, first_line

log = logging.getLogger("kdrun")
SWEEP_FILE = "tracking.json"  # in a sweep dir: the parent run of each tracker, for the jobs
_broken = set()  # trackers that failed in this process (their config, as text): not built again
_job = None  # the Job of the Hydra job running in this process


def check(cfg):
    """Preflight: every chosen tracker's library is installed (a missing one names its extra)."""
    for name, node in _nodes(cfg).items():
        target = node.get("_target_") if OmegaConf.is_dict(node) else None
        if not isinstance(target, str) or "." not in target:
            raise KdrunError(f"logger.trackers.{name} needs a _target_ naming a tracker class")
        module, _, attr = target.rpartition(".")
        try:
            cls = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as e:
            raise KdrunError(f"logger.trackers.{name}: cannot import {target}: {first_line(e)}") from None
        needs = getattr(cls, "requires", None)
        if needs and importlib.util.find_spec(needs) is None:
            extra = getattr(cls, "extra", needs)
            raise KdrunError(f"logger={name} needs the {needs} package: pip install 'kdrun[{extra}]'")


def _nodes(cfg):
    logger = cfg.get("logger") if cfg is not None else None
    trackers = logger.get("trackers") if logger is not None else None
    return dict(trackers.items()) if trackers else {}


class Trackers:
    """Several trackers behind one call; a tracker that raises is reported once and dropped."""

    def __init__(self, trackers, keys=None):
        self.trackers = dict(trackers)  # name -> tracker object
        self.keys = dict(keys or {})  # name -> its config as text (see _broken)

    @classmethod
    def from_config(cls, cfg):
        """The trackers `cfg.logger` chose (none on torchrun's other ranks), or None when there are none."""
        from hydra.utils import instantiate

        if not distributed.is_main():
            return None
        built, keys = {}, {}
        for name, node in _nodes(cfg).items():
            key = name
            try:
                key = json.dumps(OmegaConf.to_container(node, resolve=True), sort_keys=True, default=str)
                if key in _broken:
                    continue
                built[name], keys[name] = instantiate(node, _convert_="all"), key
            except Exception as e:
                _warn(name, e)
                _broken.add(key)
        return cls(built, keys) if built else None

    def __bool__(self):
        return bool(self.trackers)

    def _guarded(self, name, method, *args):
        """(True, result) of one tracker's method; (False, None) when it raised (it is dropped)."""
        tracker = self.trackers[name]
        try:
            return True, getattr(tracker, method)(*args)
        except Exception as e:
            _warn(name, e)
            _broken.add(self.keys.get(name, name))
            del self.trackers[name]
            with contextlib.suppress(Exception):
                tracker.close()
            return False, None

    def call(self, method, ids, *args):
        """`method` of each tracker with its own run id from `ids` first (ids None: every tracker, with
        no run id)."""
        for name in list(self.trackers):
            if ids is None:
                self._guarded(name, method, *args)
            elif name in ids:
                self._guarded(name, method, ids[name], *args)

    def start(self, run_dir, name, tags, parents=None):
        """Start a run in each tracker (a child of `parents`' run of that tracker); {tracker: run id}."""
        ids = {}
        for tracker in list(self.trackers):
            ok, run = self._guarded(tracker, "start", run_dir, name, tags, (parents or {}).get(tracker))
            if ok:
                ids[tracker] = run
        return ids


def _warn(name, exc):
    message = first_line(exc)
    if len(message) > 300:  # a long one (an HTTP error) keeps its start and its cause, at the end
        message = message[:200] + " ... " + message[-100:]
    log.warning("tracking: %s is off from here on (the run goes on): %s: %s", name, type(exc).__name__, message)


def scalars(row):
    """The numbers of a metrics row (lists, None and non-finite values left out)."""
    return {k: float(v) for k, v in row.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


def _status(run_dir, error, error_wins=True):
    """completed, reused, failed or interrupted: what the exception says (unless `error_wins` is false
    and results.json says the run completed before it), else results.json's word."""
    from kdrun.interrupt import Interrupted

    path = Path(run_dir) / "results.json"
    results = {}
    if path.is_file():
        with contextlib.suppress(Exception):
            results = json.loads(path.read_text())
    status = results.get("status")
    if error is not None and status not in ("failed", "interrupted"):
        if error_wins or status not in ("completed", "reused"):
            status = "interrupted" if isinstance(error, (Interrupted, KeyboardInterrupt)) else "failed"
    return status or "completed", results


class Run:
    """One tracked run: a job's, or a child's (a Recorder's folder below the job's)."""

    def __init__(self, trackers, run_dir, ids, fallback_config=None):
        self.trackers, self.dir, self.ids, self.open = trackers, Path(run_dir), ids, True
        self.fallback_config, self.config_logged = fallback_config, False

    def log_config(self):
        """The run's config, once: its config.yaml (what the command really ran with, the recipe
        overrides folded in), else the job's config as composed."""
        if self.config_logged:
            return
        self.config_logged = True
        config = self.fallback_config
        if (self.dir / "config.yaml").is_file():
            with contextlib.suppress(Exception):
                config = OmegaConf.to_container(OmegaConf.load(self.dir / "config.yaml"))
        if config is not None:
            self.trackers.call("config", self.ids, config)

    def resumed_at(self, epoch):
        self.trackers.call("resumed_at", self.ids, epoch)

    def epoch_end(self, row):
        self.trackers.call("metrics", self.ids, scalars(row), row["epoch"])

    def finish(self, error=None, extra_files=(), error_wins=True):
        if not self.open:
            return
        self.open = False
        self.log_config()
        status, results = _status(self.dir, error, error_wins)
        tags = {"kdrun.status": status}
        for key in ("teacher_key", "teacher", "student"):
            if isinstance(results.get(key), str):
                tags[f"kdrun.{key}"] = results[key]
        if error is not None and status in ("failed", "interrupted"):
            tags["kdrun.error"] = first_line(error)
        files = sorted(p for p in self.dir.iterdir() if p.is_file()) if self.dir.is_dir() else []
        self.trackers.call("finish", self.ids, [*files, *extra_files], status, tags)


class Job:
    """The tracked run of one Hydra job, and the child runs of the Recorders below its folder."""

    def __init__(self, trackers, cfg, run_dir):
        self.trackers, self.dir = trackers, _absolute(run_dir)
        self.command = cfg.get("command")
        name, parents, tags = f"{self.command} {self.dir.name}", None, {"kdrun.command": str(self.command),
                                                                          "kdrun.run_dir": str(self.dir)}
        sweep = _sweep_of_job()
        if sweep is not None:
            sweep_dir, num, overrides = sweep
            parents, swept = _read_sweep_file(sweep_dir)
            shown = [o for o in overrides if o.partition("=")[0] in swept]
            name = f"{num}: {' '.join(shown)}" if shown else f"job {num}"
            tags.update({"kdrun.sweep_dir": str(sweep_dir), "kdrun.job": str(num)})
        config = OmegaConf.to_container(cfg, resolve=True)
        self.root = Run(trackers, self.dir, trackers.start(self.dir, name, tags, parents), config)
        self.children = {}

    def run_for(self, run_dir):
        run_dir = _absolute(run_dir)
        if run_dir == self.dir:
            self.root.log_config()  # the command has written config.yaml by now
            return self.root
        if run_dir in self.children:
            return self.children[run_dir]
        for child in self.children.values():  # kdrun trains one model at a time: the earlier ones are done
            child.finish()
        try:
            name = str(run_dir.relative_to(self.dir))
        except ValueError:
            name = run_dir.name
        tags = {"kdrun.command": str(self.command), "kdrun.run_dir": str(run_dir)}
        child = Run(self.trackers, run_dir, self.trackers.start(run_dir, name, tags, self.root.ids))
        child.log_config()
        self.children[run_dir] = child
        return child

    def end(self, error=None):
        for child in self.children.values():  # a child that completed before the error stays completed
            child.finish(error, error_wins=False)
        self.root.finish(error)
        self.trackers.call("close", None)


@contextlib.contextmanager
def job(cfg, run_dir):
    """Track the Hydra job that runs inside this block (nothing when `logger` chose no tracker)."""
    global _job
    trackers = Trackers.from_config(cfg)
    current = None
    if trackers:
        try:
            current = Job(trackers, cfg, run_dir)
        except Exception as e:  # tracking never costs the run
            _warn("tracking", e)
    _job = current
    try:
        yield current
    except BaseException as e:
        _end(current, e)
        raise
    else:
        _end(current, None)
    finally:
        _job = None


def _end(current, error):
    if current is not None:
        try:
            current.end(error)
        except Exception as e:
            _warn("tracking", e)


def run_for(run_dir):
    """The tracked run a Recorder in `run_dir` feeds, or None when nothing is tracked."""
    if _job is None:
        return None
    try:
        return _job.run_for(run_dir)
    except Exception as e:
        _warn("tracking", e)
        return None


def _absolute(path):
    return Path(os.path.abspath(path))


def _sweep_of_job():
    """(sweep dir, job number, the job's overrides) inside a Hydra multirun job, else None."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return None
    hc = HydraConfig.get()
    if hc.mode != RunMode.MULTIRUN:
        return None
    return Path(hc.sweep.dir), hc.job.num, list(hc.overrides.task)


def _read_sweep_file(sweep_dir):
    path = Path(sweep_dir) / SWEEP_FILE
    if not path.is_file():
        return None, []
    with contextlib.suppress(Exception):
        saved = json.loads(path.read_text())
        return saved.get("runs") or None, saved.get("swept", [])
    return None, []


def _swept_keys(task_overrides):
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(list(task_overrides))
    return [o.get_key_element() for o in parsed if o.is_sweep_override()]


def sweep_started(config):
    """The parent run of a sweep, before its jobs start (main process; see kdrun.callbacks)."""
    trackers = Trackers.from_config(config)
    if not trackers:
        return
    from kdrun.io import write_json

    sweep_dir = Path(config.hydra.sweep.dir)
    overrides = list(config.hydra.overrides.task)
    tags = {"kdrun.command": str(config.get("command")), "kdrun.sweep": " ".join(overrides),
            "kdrun.run_dir": str(sweep_dir)}
    ids = trackers.start(sweep_dir, f"{config.get('command')} sweep {sweep_dir.name}", tags)
    sweep_dir.mkdir(parents=True, exist_ok=True)
    write_json(sweep_dir / SWEEP_FILE, {"runs": ids, "swept": _swept_keys(overrides)})
    trackers.call("close", None)


def sweep_ended(config, rows):
    """Finish the sweep's parent run: summary.csv and the sweep's report (report.md/.csv/.png, rendered
    for the trackers only; `kdrun report SWEEP_DIR` writes the same files into the sweep dir)."""
    sweep_dir = Path(config.hydra.sweep.dir)
    ids, _ = _read_sweep_file(sweep_dir)
    trackers = Trackers.from_config(config) if ids else None
    if not trackers:
        return
    import tempfile

    failed = [r for r in rows if r.get("status") != "completed"]
    with tempfile.TemporaryDirectory(prefix="kdrun-report-") as tmp:
        files = []
        try:
            from kdrun import report

            _, report_rows = report.write([sweep_dir], tmp, title=f"kdrun sweep {sweep_dir}")
            files = sorted(Path(tmp).iterdir()) if report_rows else []
        except Exception as e:  # a sweep with nothing to report still ends its parent run
            log.info("tracking: no report for this sweep: %s", first_line(e))
        run = Run(trackers, sweep_dir, ids)
        run.config_logged = True  # its jobs' runs have theirs
        run.finish(KdrunError(f"{len(failed)} job(s) failed") if failed else None, extra_files=files)
    trackers.call("close", None)
