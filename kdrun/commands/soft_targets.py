"""`kdrun soft-targets`: compute and cache the teacher's logits over the transfer set."""

import time

from kdrun.commands import teacher
from kdrun.io import write_json
from kdrun.parts import DataPart, OutputsPart
from kdrun.preflight import check_inputs
from kdrun.run import save_config


def preflight(cfg, overrides=()):
    transfer = check_inputs(cfg)
    teacher.check(cfg, transfer, overrides)


def run(cfg, run_dir):
    save_config(cfg, run_dir)
    started = time.perf_counter()
    source, outputs = DataPart.of(cfg), OutputsPart.of(cfg, run_dir)
    data = source.load()
    taught_by = teacher.source(cfg, data.transfer)
    logits, info = teacher.cached_logits(taught_by, data)
    results = {"command": "soft-targets", "status": "completed", "dataset": outputs.dataset,
               "teacher": taught_by.name, "n": int(logits.shape[0]), "num_classes": int(logits.shape[-1]),
               "wall_s": round(time.perf_counter() - started, 3), "run_dir": str(run_dir), **info,
               "config": outputs.config()}
    write_json(outputs.run_dir / "results.json", results)
    return results
