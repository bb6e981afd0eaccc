"""A fused sweep, `kdrun distill sweep.fused=true T=[1,2,5,10,20]`: the students of a sweep over T and
alpha train together as one StackedModels through the one training loop, then each is written as an
ordinary distill run dir (<run_dir>/0, 1, ...: config.yaml, metrics.jsonl, model.pt, results.json) that
`kdrun report` reads, beside a summary.csv like a -m sweep's. Each student is the one its own run would
train (same initialisation, data order and teacher signal) to float tolerance; the teacher's soft
targets are looked up once per batch for all of them."""

import json
import logging
from pathlib import Path

import torch
from hydra.utils import instantiate

from kdrun.commands.common import (build_model, fit_role, fold_recipe_overrides, load_data, resolve_device, save_config,
                                   save_trained, target_name)
from kdrun.commands.teaching import needs, student_results, teacher_signal, uses_teacher
from kdrun.data.transfer import select_rows
from kdrun.errors import KdrunError
from kdrun.io import atomic_write, write_json
from kdrun.models.stacked import StackedModels, has_per_run_state
from kdrun.objectives.fused import FusedObjectives, member_rows
from kdrun.objectives.teachers import OncePerBatch
from kdrun.report import write_summary
from kdrun.run_config import run_config
from kdrun.sweep import FUSABLE, points

log = logging.getLogger("kdrun")


def check(cfg):
    """What a fused student may not have (checked on one point of the sweep; they share the student)."""
    with torch.device("meta"):
        model = build_model(cfg.student.model, cfg.dataset.num_classes)
    state = has_per_run_state(model)
    if state:
        raise KdrunError(f"sweep.fused=true needs a student without {state} ({cfg.student.name} has it): fused "
                         "students cannot draw the masks or keep the statistics their own runs would; sweep with -m")
    if cfg.transfer.bias_correction:
        raise KdrunError("transfer.bias_correction=true is not done in a fused sweep; sweep with -m")
    need = needs(cfg)
    if need.teacher_features or need.student_features:
        raise KdrunError(f"sweep.fused=true needs an objective on logits alone; {target_name(cfg.loss)} reads "
                         "features, which fused students do not give one by one; sweep with -m")


def run(cfg, run_dir):
    cfg = fold_recipe_overrides(cfg, ["student"])
    students = points(cfg)
    save_config(cfg, run_dir)
    device = resolve_device(cfg.device)
    data = load_data(cfg, device)
    rows = select_rows(data.train.labels.cpu(), cfg.transfer, cfg.dataset.subset_seed)
    transfer_set = data.train.subset(rows.train, labelled=cfg.transfer.labels)
    taught = [uses_teacher(p) for p in students]
    signal, info = teacher_signal(students[taught.index(True)], data) if any(taught) else (None, None)
    signal = OncePerBatch(signal) if signal else None
    objective = FusedObjectives(instantiate(p.loss, teacher=signal if t else None) for p, t in zip(students, taught))
    models = []
    for _ in students:  # what each student's own run builds: the same seed, so the same initial weights
        torch.manual_seed(cfg.seed)
        models.append(build_model(cfg.student.model, data.num_classes))
    stacked = StackedModels(models).to(device)
    log.info("fused sweep: %d students of %s (%s) in one model", len(students), cfg.student.name,
             ", ".join(_point_name(p) for p in students))
    _, seconds = fit_role(cfg, run_dir, "student", stacked, objective, data, transfer_set)
    epochs = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    summary = []
    for k, point in enumerate(students):
        sub = Path(run_dir) / str(k)
        save_config(point, sub)
        own = member_rows(epochs, k)
        atomic_write(sub / "metrics.jsonl", lambda f: f.write("".join(json.dumps(r) + "\n" for r in own)), mode="w")
        model = build_model(point.student.model, data.num_classes)
        model.load_state_dict(stacked.member_state_dict(k))
        no_teacher = {"teacher": None, "teacher_key": None}
        extra = {**student_results(point, None, rows, info if taught[k] else no_teacher),
                 "fused_sweep": str(run_dir), "fused_students": len(students)}
        results = save_trained(point, sub, "student", model, own[-1], seconds, transfer_set, extra)
        summary.append({"job": str(k), **{key: point[key] for key in FUSABLE}, **results})
    write_summary(run_dir, list(FUSABLE), summary)
    results = {"command": cfg.command, "status": "completed", "role": "fused sweep", "run_dir": str(run_dir), "config": run_config(cfg),
               "wall_s": round(seconds, 3), "students": [{"run_dir": r["run_dir"], "T": r["T"], "alpha": r["alpha"],
                                                          "test_errors": r["test_errors"]} for r in summary]}
    write_json(Path(run_dir) / "results.json", results)
    log.info("fused sweep: test errors %s", ", ".join(f"{_point_name(p)}: {r['test_errors']}"
                                                     for p, r in zip(students, summary)))
    return results


def _point_name(point):
    return " ".join(f"{key}={point[key]}" for key in FUSABLE)
