"""`kdrun train`: train a teacher (or any model) on labels and publish it to the teacher store."""

import logging
from pathlib import Path

from kdrun import store
from kdrun.commands.common import check_buildable, check_inputs, fold_recipe_overrides, load_data, resolve_device, save_config, train_model
from kdrun.io import write_json
from kdrun.objectives import CrossEntropy

log = logging.getLogger("kdrun")


def preflight(cfg, overrides=()):
    check_inputs(cfg)
    check_buildable(fold_recipe_overrides(cfg, ["teacher"]), ["teacher"])


def run(cfg, run_dir):
    cfg = fold_recipe_overrides(cfg, ["teacher"])
    save_config(cfg, run_dir)
    identity = store.teacher_identity(cfg, cfg.seed)
    key = store.teacher_key(cfg, cfg.seed)
    existing = store.lookup(cfg.workdir, key)
    if existing is not None and not cfg.retrain:
        log.info("teacher %s (key %s) is already trained: %s (retrain=true trains it again)",
                 cfg.teacher.name, key, existing)
        results = {**store.stored_results(cfg.workdir, key), "command": "train", "status": "reused",
                   "run_dir": str(run_dir), "model": str(existing)}
        write_json(run_dir / "results.json", results)
        return results
    device = resolve_device(cfg.device)
    data = load_data(cfg, device)
    extra = {"teacher": cfg.teacher.name, "student": None, "T": None, "alpha": None, "teacher_key": key}
    results, _ = train_model(cfg, run_dir, "teacher", CrossEntropy(), data, data.train, device, extra)
    path = store.publish(cfg.workdir, key, Path(results["model"]), identity, run_dir, results)
    log.info("teacher %s stored as %s", cfg.teacher.name, path)
    return results
