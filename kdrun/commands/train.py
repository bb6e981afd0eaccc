"""`kdrun train`: train a teacher (or any model) on labels and publish it to the teacher store. With
`teacher=ensemble`, train every stored member that is missing, then evaluate the ensemble."""

import logging
from pathlib import Path

from kdrun import store
from kdrun.commands import teacher
from kdrun.data.loading import load_data
from kdrun.data.transfer import check_held_out
from kdrun.devices import resolve_device
from kdrun.io import write_json
from kdrun.objectives import CrossEntropy
from kdrun.parts import DataPart, OutputsPart, RolePart, TeacherSource, fold_recipe_overrides
from kdrun.preflight import check_buildable, check_inputs
from kdrun.run import save_config
from kdrun.training import train_model

log = logging.getLogger("kdrun")


def preflight(cfg, overrides=()):
    transfer = check_inputs(cfg)
    cfg = fold_recipe_overrides(cfg, ["teacher"])
    check_held_out("teacher.recipe.val_size", cfg.teacher.recipe.get("val_size"), transfer["n"])
    if not teacher.is_ensemble(cfg):
        check_buildable(cfg.dataset, [RolePart.of(cfg, "teacher")])
        return
    for member in teacher.source(cfg, transfer).members:
        if member.ckpt:
            member.check(cfg.dataset)
        else:
            check_buildable(cfg.dataset, [RolePart.of(member.cfg, "teacher")])
            check_held_out(f"{member.where}: teacher.recipe.val_size", member.cfg.teacher.recipe.get("val_size"),
                           transfer["n"])


def run(cfg, run_dir):
    cfg = fold_recipe_overrides(cfg, ["teacher"])
    save_config(cfg, run_dir)
    source = DataPart.of(cfg)
    if teacher.is_ensemble(cfg):
        return _train_ensemble(cfg, source, run_dir)
    return _train_one(cfg, source, run_dir)


def _train_one(cfg, source, run_dir):
    """The teacher of `cfg` (trained with its own seed) from the store, or trained now and stored; the
    store's key holds the dataset's identity (source.identity: its files' hashes)."""
    role, outputs = RolePart.of(cfg, "teacher"), OutputsPart.of(cfg, run_dir)
    stored = TeacherSource.of(cfg, source.identity, seed=outputs.seed)
    key = stored.key

    def train(checkpointer):
        device = resolve_device(source.device)
        data = load_data(source, device)
        extra = {"teacher": role.name, "student": None, "T": None, "alpha": None, "teacher_key": key}
        return train_model(role, outputs, CrossEntropy(), data, data.train, device, extra,
                           checkpointer=checkpointer)[0]

    path, results = store.train_or_reuse(stored.workdir, key, stored.identity(), train, cfg.retrain)
    if results is not None:
        log.info("teacher %s stored as %s", role.name, path)
        return results
    log.info("teacher %s (key %s) is already trained: %s (retrain=true trains it again)", role.name, key, path)
    results = {**store.stored_results(stored.workdir, key), "command": "train", "status": "reused",
               "run_dir": str(run_dir), "model": str(path)}
    write_json(Path(run_dir) / "results.json", results)
    return results


def _train_ensemble(cfg, source, run_dir):
    """Each stored member in its own folder (member_0, ...; reused when the store has it), then the
    ensemble's own row: its test errors beside its members'."""
    ensemble = teacher.source(cfg, source.identity)
    for i, member in enumerate(ensemble.members):
        if member.cfg is not None:
            member_cfg = member.cfg.copy()
            member_cfg.seed = member.seed
            _train_one(member_cfg, source, Path(run_dir) / f"member_{i}")
    _, _, record = teacher.load(ensemble, source.load())
    log.info("%s: %d test errors (members: %s)", record["teacher"], record["test_errors"],
             ", ".join(str(m["test_errors"]) for m in record["members"]))
    results = {**record, "status": "completed", "run_dir": str(run_dir), "record": record["run_dir"],
               "config": OutputsPart.of(cfg, run_dir).config()}
    write_json(Path(run_dir) / "results.json", results)
    return results
