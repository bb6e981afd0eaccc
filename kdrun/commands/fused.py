"""A fused sweep, `kdrun distill sweep.fused=true T=[1,2,5,10,20]`: the students of a sweep over T and
alpha train together as one StackedModels through the one training loop, then each is written as an
ordinary distill run dir (<run_dir>/0, 1, ...: config.yaml, metrics.jsonl, model.pt, results.json) that
`kdrun report` reads, beside a summary.csv like a -m sweep's. Each student is the one its own run would
train (same initialisation, data order and teacher signal) to float tolerance; the teacher's soft
targets are looked up once per batch for all of them."""

import json
import logging

import torch

from kdrun.commands import teacher
from kdrun.commands.teaching import needs, student_results, teacher_signal
from kdrun.data.loading import load_data
from kdrun.data.transfer import select_rows
from kdrun.devices import resolve_device
from kdrun.errors import KdrunError
from kdrun.io import atomic_write, write_json
from kdrun.models.build import build_model
from kdrun.models.stacked import StackedModels, has_per_run_state
from kdrun.objectives.fused import FusedObjectives, member_rows
from kdrun.objectives.teachers import OncePerBatch
from kdrun.parts import DataPart, ObjectivePart, OutputsPart, RolePart, fold_recipe_overrides
from kdrun.report import write_summary
from kdrun.run import save_config, target_name
from kdrun.sweep import FUSABLE, points
from kdrun.training import fit_role, save_trained

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
    source, student, outputs = DataPart.of(cfg), RolePart.of(cfg, "student"), OutputsPart.of(cfg, run_dir)
    objectives = [ObjectivePart.of(p) for p in students]
    device = resolve_device(source.device)
    data = load_data(source, device)
    rows = select_rows(data.train.labels.cpu(), source.transfer, source.dataset.subset_seed)
    transfer_set = data.train.subset(rows.train, labelled=source.transfer.labels)
    taught = [o.uses_teacher for o in objectives]
    signal, info = None, None
    if any(taught):  # the students share one teacher: the first taught point's
        first = taught.index(True)
        signal, info = teacher_signal(objectives[first], teacher.source(students[first], data.transfer), data,
                                      student.channels_last)
    signal = OncePerBatch(signal) if signal else None
    objective = FusedObjectives(o.build(teacher=signal if t else None) for o, t in zip(objectives, taught))
    models = []
    for _ in students:  # what each student's own run builds: the same seed, so the same initial weights
        torch.manual_seed(outputs.seed)
        models.append(build_model(student.model, data.num_classes))
    stacked = StackedModels(models).to(device)
    log.info("fused sweep: %d students of %s (%s) in one model", len(students), student.name,
             ", ".join(_point_name(p) for p in students))
    _, seconds = fit_role(student, outputs, stacked, objective, data, transfer_set, val=rows.val_split(data.train))
    epochs = [json.loads(line) for line in (outputs.run_dir / "metrics.jsonl").read_text().splitlines()]
    summary = []
    for k, (point, point_objective) in enumerate(zip(students, objectives)):
        sub = outputs.run_dir / str(k)
        save_config(point, sub)
        own = member_rows(epochs, k)
        atomic_write(sub / "metrics.jsonl", lambda f: f.write("".join(json.dumps(r) + "\n" for r in own)), mode="w")
        point_student = RolePart.of(point, "student")
        model = build_model(point_student.model, data.num_classes)
        model.load_state_dict(stacked.member_state_dict(k))
        no_teacher = {"teacher": None, "teacher_key": None}
        extra = {**student_results(point_student, point_objective, source.transfer, None, rows,
                                   info if taught[k] else no_teacher),
                 "fused_sweep": str(run_dir), "fused_students": len(students)}
        results = save_trained(point_student, OutputsPart.of(point, sub), model, own[-1], seconds, transfer_set, extra,
                               data.num_classes)
        summary.append({"job": str(k), **{key: point[key] for key in FUSABLE}, **results})
    write_summary(run_dir, list(FUSABLE), summary)
    results = {"command": outputs.command, "status": "completed", "role": "fused sweep", "run_dir": str(run_dir),
               "config": outputs.config(), "wall_s": round(seconds, 3),
               "students": [{"run_dir": r["run_dir"], "T": r["T"], "alpha": r["alpha"],
                             "test_errors": r["test_errors"]} for r in summary]}
    write_json(outputs.run_dir / "results.json", results)
    log.info("fused sweep: test errors %s", ", ".join(f"{_point_name(p)}: {r['test_errors']}"
                                                     for p, r in zip(students, summary)))
    return results


def _point_name(point):
    return " ".join(f"{key}={point[key]}" for key in FUSABLE)
