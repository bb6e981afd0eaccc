"""`kdrun mutual`: `mutual.students` networks of `student=` trained together (deep mutual learning).
Each student is saved as an ordinary run (student_0/, ...: model.pt, results.json); the run's own
results.json is their ensemble's."""

import logging
from pathlib import Path

import torch
from hydra.utils import instantiate

from kdrun.commands.common import (build_model, check_without_teacher, fit_role, fold_recipe_overrides, labelled_rows,
                                   load_data, n_params, resolve_device, save_config, save_trained, target_name)
from kdrun.ensemble import Ensemble
from kdrun.io import write_json
from kdrun.run_config import run_config
from kdrun.validate import integer

log = logging.getLogger("kdrun")


def preflight(cfg, overrides=()):
    integer("mutual.students", cfg.mutual.students, 2)
    check_without_teacher(cfg, "loss")


def run(cfg, run_dir, label=None):
    cfg = fold_recipe_overrides(cfg, ["student"])
    save_config(cfg, run_dir)
    device = resolve_device(cfg.device)
    data = load_data(cfg, device)
    train_set, chosen = labelled_rows(cfg, data)
    torch.manual_seed(cfg.seed)  # the students are built one after another: each its own initialisation
    students = [build_model(cfg.student.model, data.num_classes) for _ in range(cfg.mutual.students)]
    cohort = Ensemble(students, "arithmetic").to(device)
    last, seconds = fit_role(cfg, run_dir, "student", cohort, instantiate(cfg.loss), data, train_set)
    common = {"label": label, "student": cfg.student.name, "teacher": None, "teacher_key": None, "T": cfg.T,
              "alpha": None, "loss": target_name(cfg.loss), "temperature_schedule": target_name(cfg.temperature),
              "weight": cfg.loss.get("weight"), "n_students": len(students), **chosen,
              "jitter": cfg.student.recipe.jitter, "flip": cfg.student.recipe.get("flip", False)}
    rows = []
    for i, (student, errors) in enumerate(zip(cohort.members, last["member_test_errors"])):
        own = {**last, "test_errors": errors, "test_accuracy": 1 - errors / last["n_test"], "train_accuracy": None}
        rows.append(save_trained(cfg, Path(run_dir) / f"student_{i}", "student", student, own, seconds, train_set,
                                 {**common, "role": "mutual student", "member": i}))
    results = {
        "command": cfg.command, "status": "completed", "role": "mutual ensemble", "dataset": cfg.dataset.name,
        "seed": cfg.seed, "epochs": cfg.student.recipe.epochs, "lr": cfg.student.recipe.optimizer.lr,
        "batch_size": cfg.student.recipe.batch_size, "n_train": len(train_set), "n_params": n_params(cohort),
        "wall_s": round(seconds, 3), "run_dir": str(run_dir), "model": None,
        "train_accuracy": last["train_accuracy"], **{k: last[k] for k in ("test_accuracy", "test_errors", "n_test")},
        "students": [{"model": r["model"], "test_errors": r["test_errors"]} for r in rows],
        "students_test_errors_mean": sum(r["test_errors"] for r in rows) / len(rows), **common,
        "config": run_config(cfg),
    }
    write_json(Path(run_dir) / "results.json", results)
    log.info("mutual: students %s test errors, their ensemble %d", [r["test_errors"] for r in rows], results["test_errors"])
    return results
