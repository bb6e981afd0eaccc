"""`kdrun self-distill`: one network (`student=`) teaches itself across two distorted views of each batch."""

from omegaconf import OmegaConf

from kdrun.data.loading import labelled_rows, load_data
from kdrun.devices import resolve_device
from kdrun.parts import DataPart, ObjectivePart, OutputsPart, RolePart, fold_recipe_overrides
from kdrun.preflight import check_without_teacher
from kdrun.run import save_config, target_name
from kdrun.training import train_model


def preflight(cfg, overrides=()):
    check_without_teacher(cfg, "loss", pixels=None)


def run(cfg, run_dir, label=None):
    cfg = fold_recipe_overrides(cfg, ["student"])
    save_config(cfg, run_dir)
    source, student, objective = DataPart.of(cfg), RolePart.of(cfg, "student"), ObjectivePart.of(cfg)
    device = resolve_device(source.device)
    data = load_data(source, device)
    train_set, chosen = labelled_rows(source, data)
    built = objective.build(pixels=data.train)
    setup = OmegaConf.to_container(objective.loss, resolve=True)
    extra = {"label": label, "role": "self-distilled", "student": student.name, "teacher": None, "teacher_key": None,
             "T": objective.T, "alpha": None, "loss": target_name(objective.loss),
             "temperature_schedule": target_name(objective.temperature),
             **chosen, **{k: setup.get(k) for k in ("lam", "mu", "mmd_kernel", "bandwidth", "detach_targets")},
             "views": built.distortions.describe(), "jitter": student.recipe.jitter,
             "flip": student.recipe.get("flip", False),
             "distortions": {k: v for k, v in setup["distortions"].items() if k != "_target_"}}
    return train_model(student, OutputsPart.of(cfg, run_dir), built, data, train_set, device, extra)[0]
