"""`kdrun distill`: train a student from the teacher's cached soft targets (alpha=0: from labels alone)."""

from hydra.utils import instantiate

from kdrun.commands import teacher
from kdrun.commands.common import check_inputs, fold_recipe_overrides, load_data, resolve_device, save_config, train_model
from kdrun.objectives import CachedLogits


def preflight(cfg, overrides=()):
    transfer = check_inputs(cfg)
    if not instantiate(cfg.alpha_schedule).is_zero():
        teacher.check(cfg, transfer, overrides)


def run(cfg, run_dir):
    cfg = fold_recipe_overrides(cfg, ["student"])
    save_config(cfg, run_dir)
    device = resolve_device(cfg.device)
    data = load_data(cfg, device)
    info = {"teacher": None, "teacher_key": None}
    signal = None
    if not instantiate(cfg.alpha_schedule).is_zero():
        logits, info = teacher.cached_logits(cfg, data)
        signal = CachedLogits(logits.to(device))
    objective = instantiate(cfg.loss, teacher=signal)
    extra = {"student": cfg.student.name, "T": cfg.T, "alpha": cfg.alpha,
             "loss": cfg.loss._target_.rsplit(".", 1)[-1], **info}
    results, _ = train_model(cfg, run_dir, "student", objective, data, device, extra)
    return results
