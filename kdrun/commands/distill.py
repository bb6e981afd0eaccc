"""`kdrun distill`: train a student from the teacher's cached soft targets (alpha=0: from labels alone)."""

from hydra.utils import instantiate

from kdrun.commands import teacher
from kdrun.commands.common import check_buildable, check_inputs, fold_recipe_overrides, load_data, resolve_device, save_config, train_model
from kdrun.errors import KdrunError, first_line
from kdrun.objectives import CachedLogits


def preflight(cfg, overrides=()):
    transfer = check_inputs(cfg)
    check_student(fold_recipe_overrides(cfg, ["student"]))
    if uses_teacher(cfg):
        teacher.check(cfg, transfer, overrides)


def uses_teacher(cfg):
    return not instantiate(cfg.alpha_schedule).is_zero()


def check_student(cfg):
    """The student's model, recipe and objective can be built, and fit cached soft targets."""
    check_buildable(cfg, ["student"])
    with_teacher = uses_teacher(cfg)
    try:
        instantiate(cfg.loss, teacher=CachedLogits(None) if with_teacher else None)
    except Exception as e:
        raise KdrunError(f"invalid loss config: {first_line(e.__cause__ or e)}") from None
    if cfg.student.recipe.jitter and with_teacher:
        raise KdrunError("student.recipe.jitter must be 0 with cached soft targets: they are the teacher's "
                         "outputs on unshifted inputs, and a shifted view would be paired with them")


def run(cfg, run_dir):
    cfg = fold_recipe_overrides(cfg, ["student"])
    save_config(cfg, run_dir)
    device = resolve_device(cfg.device)
    data = load_data(cfg, device)
    info = {"teacher": None, "teacher_key": None}
    signal = None
    if uses_teacher(cfg):
        logits, info = teacher.cached_logits(cfg, data)
        signal = CachedLogits(logits.to(device))
    objective = instantiate(cfg.loss, teacher=signal)
    extra = {"student": cfg.student.name, "T": cfg.T, "alpha": cfg.alpha,
             "temperature_schedule": _short(cfg.temperature), "alpha_schedule": _short(cfg.alpha_schedule),
             "loss": _short(cfg.loss), **info}
    results, _ = train_model(cfg, run_dir, "student", objective, data, device, extra)
    return results


def _short(node):
    return node._target_.rsplit(".", 1)[-1]
