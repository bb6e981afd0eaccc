"""`kdrun mutual`: `mutual.students` networks of `student=` trained together (deep mutual learning).
Each student is saved as an ordinary run (student_0/, ...: model.pt, results.json); the run's own
results.json is their ensemble's."""

import logging

import torch

from kdrun.data.loading import labelled_rows, load_data
from kdrun.devices import resolve_device
from kdrun.ensemble import Ensemble
from kdrun.io import write_json
from kdrun.models.build import build_model
from kdrun.parts import DataPart, ObjectivePart, OutputsPart, RolePart, fold_recipe_overrides
from kdrun.preflight import check_without_teacher
from kdrun.run import save_config, target_name
from kdrun.training import fit_role, n_params, save_trained
from kdrun.validate import integer

log = logging.getLogger("kdrun")


def preflight(cfg, overrides=()):
    integer("mutual.students", cfg.mutual.students, 2)
    check_without_teacher(cfg, "loss")


def run(cfg, run_dir, label=None):
    cfg = fold_recipe_overrides(cfg, ["student"])
    save_config(cfg, run_dir)
    source, student, objective = DataPart.of(cfg), RolePart.of(cfg, "student"), ObjectivePart.of(cfg)
    outputs, n_students = OutputsPart.of(cfg, run_dir), cfg.mutual.students
    device = resolve_device(source.device)
    data = load_data(source, device)
    train_set, chosen = labelled_rows(source, data)
    torch.manual_seed(outputs.seed)  # the students are built one after another: each its own initialisation
    students = [build_model(student.model, data.num_classes) for _ in range(n_students)]
    cohort = Ensemble(students, "arithmetic").to(device)
    last, seconds = fit_role(student, outputs, cohort, objective.build(), data, train_set)
    common = {"label": label, "student": student.name, "teacher": None, "teacher_key": None, "T": objective.T,
              "alpha": None, "loss": target_name(objective.loss), "temperature_schedule": target_name(objective.temperature),
              "weight": objective.loss.get("weight"), "n_students": len(students), **chosen,
              "jitter": student.recipe.jitter, "flip": student.recipe.get("flip", False)}
    rows = []
    for i, (member, errors) in enumerate(zip(cohort.members, last["member_test_errors"])):
        own = {**last, "test_errors": errors, "test_accuracy": 1 - errors / last["n_test"], "train_accuracy": None}
        rows.append(save_trained(student, outputs.at(outputs.run_dir / f"student_{i}"), member, own, seconds, train_set,
                                 {**common, "role": "mutual student", "member": i}, data.num_classes))
    recipe = student.recipe
    results = {
        "command": outputs.command, "status": "completed", "role": "mutual ensemble", "dataset": outputs.dataset,
        "seed": outputs.seed, "epochs": recipe.epochs, "lr": recipe.optimizer.lr,
        "batch_size": recipe.batch_size, "n_train": len(train_set), "n_params": n_params(cohort),
        "wall_s": round(seconds, 3), "run_dir": str(run_dir), "model": None,
        "train_accuracy": last["train_accuracy"], **{k: last[k] for k in ("test_accuracy", "test_errors", "n_test")},
        "students": [{"model": r["model"], "test_errors": r["test_errors"]} for r in rows],
        "students_test_errors_mean": sum(r["test_errors"] for r in rows) / len(rows), **common,
        "config": outputs.config(),
    }
    write_json(outputs.run_dir / "results.json", results)
    log.info("mutual: students %s test errors, their ensemble %d", [r["test_errors"] for r in rows], results["test_errors"])
    return results
