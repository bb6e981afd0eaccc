"""What a distilled student's run (kdrun distill) and a fused sweep's students share: whether the
teacher is used at all, the signal the objective asks the teacher's logits from, and what a
distilled student's results.json records."""

import logging

import torch

from kdrun.commands import teacher as teachers
from kdrun.data.memory import budget_bytes
from kdrun.data.transfer import describe
from kdrun.models.build import feature_paths, head_path
from kdrun.models.features import PENULTIMATE, FeatureTap, resolve_stages
from kdrun.objectives import CachedLogits, OnlineTeacher
from kdrun.objectives.base import teacher_shapes
from kdrun.objectives.teachers import CachedFeatures
from kdrun.parts import ObjectivePart
from kdrun.run import target_name

log = logging.getLogger("kdrun")


def needs(cfg):
    """What the objective `loss=` builds declares it needs (kdrun.objectives.base.Needs)."""
    return ObjectivePart.of(cfg).needs


def uses_teacher(cfg):
    return ObjectivePart.of(cfg).uses_teacher


def online(cfg):
    """Whether the teacher runs on the student's very batch (see ObjectivePart.online)."""
    return ObjectivePart.of(cfg).online


def teacher_tap(arch, model, need):
    """A FeatureTap on the teacher (`arch`: its model config) for the stages the objective reads (None
    when it reads none)."""
    if not need.teacher_features:
        return None
    return FeatureTap(model, resolve_stages(need.teacher_features, feature_paths(arch)), head_path(arch),
                      penultimate=PENULTIMATE in need.teacher_features, named=list(feature_paths(arch)), role="teacher")


def teacher_signal(objective, teacher, data, channels_last=False):
    """What the objective (an ObjectivePart) asks for the teacher's logits (and features) of a batch, and
    what to record about it; `teacher` is its TeacherSource (None when the objective uses none)."""
    if not objective.uses_teacher:
        return None, {"teacher": None, "teacher_key": None}
    combine = teacher.spec.combine if teacher.is_ensemble else None
    if objective.online:
        model, info, _ = teachers.load(teacher, data)
        if channels_last:  # the layout of the student's batches, which it runs on
            model.to(memory_format=torch.channels_last)
        online_teacher = OnlineTeacher(model, combine, teacher_tap(teacher.spec.model, model, objective.needs))
        if objective.features_cached and _cache_fits(online_teacher, data, teacher.dataset):
            log.info("teacher features: computed once over the %d train rows (transfer.cache_features=true)",
                     len(data.train))
            return CachedFeatures.of(online_teacher, data.train), {**info, "teacher_features": "cached"}
        return online_teacher, {**info, "teacher_features": "online" if objective.needs.online_teacher else None}
    logits, info = teachers.cached_logits(teacher, data)
    return CachedLogits(logits.to(data.train.device), combine), info


def _cache_fits(online_teacher, data, dataset):
    """Whether the teacher's features over the train split fit `dataset`'s memory budget (and, on a
    GPU, a fifth of its free memory); if not, the teacher runs online and the log says why."""
    device = data.train.device
    nbytes = CachedFeatures.nbytes(teacher_shapes(online_teacher, torch.zeros((2, *data.shape), device=device)),
                                   len(data.train))
    budget = budget_bytes(dataset)
    if device.type == "cuda":
        budget = min(budget, 0.2 * torch.cuda.mem_get_info(device)[0])
    if nbytes <= budget:
        return True
    log.info("teacher features: %.3g GiB over the train split, over the memory budget of %.3g GiB: the "
             "teacher runs online", nbytes / 2**30, budget / 2**30)
    return False


def student_results(student, objective, transfer, label, rows, teacher_info):
    """What a distilled student's results.json records beyond its training (see training.save_trained):
    `student` its RolePart, `objective` the ObjectivePart, `transfer` transfer.*."""
    views = [f"{student.recipe.jitter}px jitter", "flip" if student.recipe.get("flip", False) else None]
    augment = ", ".join(filter(None, ["online teacher", *views])) if transfer.augment else None
    return {"label": label, "student": student.name, "T": objective.T, "alpha": objective.alpha,
            "temperature_schedule": target_name(objective.temperature),
            "alpha_schedule": target_name(objective.alpha_schedule), "loss": target_name(objective.loss),
            "transfer_set": describe(transfer), "labels": transfer.labels, "augment": augment,
            "jitter": student.recipe.jitter, "flip": student.recipe.get("flip", False),
            "n_val": int(rows.val.numel()) or int(student.recipe.get("val_size") or 0), **teacher_info}
