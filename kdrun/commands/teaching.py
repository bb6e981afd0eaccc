"""What a distilled student's run (kdrun distill) and a fused sweep's students share: whether the
teacher is used at all, the signal the objective asks the teacher's logits from, and what a
distilled student's results.json records."""

import torch

from kdrun.commands import teacher
from kdrun.commands.common import target_name
from kdrun.data.transfer import describe
from kdrun.models.build import feature_paths, head_path
from kdrun.models.features import PENULTIMATE, FeatureTap, resolve_stages
from kdrun.objectives import CachedLogits, OnlineTeacher
from kdrun.objectives.base import needs_of


def needs(cfg):
    """What the objective `loss=` builds declares it needs (kdrun.objectives.base.Needs)."""
    return needs_of(cfg.loss)


def uses_teacher(cfg):
    return needs(cfg).teacher


def online(cfg):
    """Whether the teacher runs on the student's very batch: the objective reads its features, or
    transfer.augment=true pairs the student's jittered view with the teacher's outputs on it."""
    need = needs(cfg)
    return need.teacher and (need.online_teacher or bool(cfg.transfer.augment))


def teacher_tap(cfg, model, need):
    """A FeatureTap on the teacher for the stages the objective reads (None when it reads none)."""
    if not need.teacher_features:
        return None
    arch = cfg.teacher.model
    return FeatureTap(model, resolve_stages(need.teacher_features, feature_paths(arch)), head_path(arch),
                      penultimate=PENULTIMATE in need.teacher_features, named=list(feature_paths(arch)), role="teacher")


def teacher_signal(cfg, data):
    """What the objective asks for the teacher's logits (and features) of a batch, and what to record
    about it."""
    need = needs(cfg)
    if not need.teacher:
        return None, {"teacher": None, "teacher_key": None}
    combine = cfg.teacher.combine if teacher.is_ensemble(cfg) else None
    if online(cfg):
        model, info, _ = teacher.load(cfg, data)
        if cfg.get("channels_last"):  # the layout of the student's batches, which it runs on
            model.to(memory_format=torch.channels_last)
        return OnlineTeacher(model, combine, teacher_tap(cfg, model, need)), info
    logits, info = teacher.cached_logits(cfg, data)
    return CachedLogits(logits.to(data.train.device), combine), info


def student_results(cfg, label, rows, teacher_info):
    """What a distilled student's results.json records beyond its training (see common.save_trained)."""
    augment = f"online teacher, {cfg.student.recipe.jitter}px jitter" if cfg.transfer.augment else None
    return {"label": label, "student": cfg.student.name, "T": cfg.T, "alpha": cfg.alpha,
            "temperature_schedule": target_name(cfg.temperature), "alpha_schedule": target_name(cfg.alpha_schedule),
            "loss": target_name(cfg.loss), "transfer_set": describe(cfg.transfer), "labels": cfg.transfer.labels,
            "augment": augment, "jitter": cfg.student.recipe.jitter, "flip": cfg.student.recipe.get("flip", False),
            "n_val": int(rows.val.numel()), **teacher_info}
