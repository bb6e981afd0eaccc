"""`kdrun self-distill`: one network (`student=`) teaches itself across two distorted views of each batch."""

from hydra.utils import instantiate
from omegaconf import OmegaConf

from kdrun.commands.common import (check_without_teacher, fold_recipe_overrides, labelled_rows, load_data, resolve_device,
                                   save_config, target_name, train_model)


def preflight(cfg, overrides=()):
    check_without_teacher(cfg, "loss", pixels=None)


def run(cfg, run_dir, label=None):
    cfg = fold_recipe_overrides(cfg, ["student"])
    save_config(cfg, run_dir)
    device = resolve_device(cfg.device)
    data = load_data(cfg, device)
    train_set, chosen = labelled_rows(cfg, data)
    objective = instantiate(cfg.loss, pixels=data.train)
    setup = OmegaConf.to_container(cfg.loss, resolve=True)
    extra = {"label": label, "role": "self-distilled", "student": cfg.student.name, "teacher": None, "teacher_key": None,
             "T": cfg.T, "alpha": None, "loss": target_name(cfg.loss), "temperature_schedule": target_name(cfg.temperature),
             **chosen, **{k: setup.get(k) for k in ("lam", "mu", "mmd_kernel", "bandwidth", "detach_targets")},
             "views": objective.distortions.describe(), "jitter": cfg.student.recipe.jitter,
             "flip": cfg.student.recipe.get("flip", False),
             "distortions": {k: v for k, v in setup["distortions"].items() if k != "_target_"}}
    return train_model(cfg, run_dir, "student", objective, data, train_set, device, extra)[0]
