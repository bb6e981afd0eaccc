"""`kdrun soft-targets`: compute and cache the teacher's logits over the transfer set."""

import time

from kdrun.commands import teacher
from kdrun.commands.common import check_inputs, load_data, resolve_device, save_config
from kdrun.io import write_json
from kdrun.run_config import run_config


def preflight(cfg, overrides=()):
    transfer = check_inputs(cfg)
    teacher.check(cfg, transfer, overrides)


def run(cfg, run_dir):
    save_config(cfg, run_dir)
    started = time.perf_counter()
    data = load_data(cfg, resolve_device(cfg.device))
    logits, info = teacher.cached_logits(cfg, data)
    results = {"command": "soft-targets", "status": "completed", "dataset": cfg.dataset.name,
               "teacher": cfg.teacher.name, "n": int(logits.shape[0]), "num_classes": int(logits.shape[-1]),
               "wall_s": round(time.perf_counter() - started, 3), "run_dir": str(run_dir), **info, "config": run_config(cfg)}
    write_json(run_dir / "results.json", results)
    return results
