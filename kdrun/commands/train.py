"""`kdrun train`: train a teacher (or any model) on labels and publish it to the teacher store. With
`teacher=ensemble`, train every stored member that is missing, then evaluate the ensemble."""

import logging
from pathlib import Path

from kdrun import store
from kdrun.commands import teacher
from kdrun.commands.common import check_buildable, check_inputs, fold_recipe_overrides, load_data, resolve_device, save_config, train_model
from kdrun.io import write_json
from kdrun.objectives import CrossEntropy
from kdrun.run_config import run_config

log = logging.getLogger("kdrun")


def preflight(cfg, overrides=()):
    check_inputs(cfg)
    cfg = fold_recipe_overrides(cfg, ["teacher"])
    if not teacher.is_ensemble(cfg):
        check_buildable(cfg, ["teacher"])
        return
    for member in teacher.members(cfg):
        if member.ckpt:
            member.check(cfg.dataset)
        else:
            check_buildable(member.cfg, ["teacher"])


def run(cfg, run_dir):
    cfg = fold_recipe_overrides(cfg, ["teacher"])
    save_config(cfg, run_dir)
    if teacher.is_ensemble(cfg):
        return _train_ensemble(cfg, run_dir)
    return _train_one(cfg, run_dir)


def _train_one(cfg, run_dir):
    key = store.teacher_key(cfg, cfg.seed)

    def train(checkpointer):
        device = resolve_device(cfg.device)
        data = load_data(cfg, device)
        extra = {"teacher": cfg.teacher.name, "student": None, "T": None, "alpha": None, "teacher_key": key}
        return train_model(cfg, run_dir, "teacher", CrossEntropy(), data, data.train, device, extra,
                           checkpointer=checkpointer)[0]

    path, results = store.train_or_reuse(cfg.workdir, key, store.teacher_identity(cfg, cfg.seed), train, cfg.retrain)
    if results is not None:
        log.info("teacher %s stored as %s", cfg.teacher.name, path)
        return results
    log.info("teacher %s (key %s) is already trained: %s (retrain=true trains it again)", cfg.teacher.name, key, path)
    results = {**store.stored_results(cfg.workdir, key), "command": "train", "status": "reused",
               "run_dir": str(run_dir), "model": str(path)}
    write_json(Path(run_dir) / "results.json", results)
    return results


def _train_ensemble(cfg, run_dir):
    """Each stored member in its own folder (member_0, ...; reused when the store has it), then the
    ensemble's own row: its test errors beside its members'."""
    for i, member in enumerate(teacher.members(cfg)):
        if member.cfg is not None:
            member_cfg = member.cfg.copy()
            member_cfg.seed = member.seed
            _train_one(member_cfg, Path(run_dir) / f"member_{i}")
    _, _, record = teacher.load(cfg, load_data(cfg, resolve_device(cfg.device)))
    log.info("%s: %d test errors (members: %s)", record["teacher"], record["test_errors"],
             ", ".join(str(m["test_errors"]) for m in record["members"]))
    results = {**record, "status": "completed", "run_dir": str(run_dir), "record": record["run_dir"],
               "config": run_config(cfg)}
    write_json(Path(run_dir) / "results.json", results)
    return results
