"""`kdrun distill`: train a student from the teacher's soft targets (alpha=0: from labels alone), on
the transfer set that `transfer.*` selects, and optionally correct its output biases afterwards."""

import logging

import torch
from hydra.utils import instantiate

from kdrun import bias
from kdrun.commands import fused, teacher
from kdrun.commands.teaching import needs, online, student_results, teacher_signal, teacher_tap, uses_teacher
from kdrun.data.loading import load_data
from kdrun.data.transfer import affected_classes, select_rows, unseen_classes
from kdrun.devices import resolve_device
from kdrun.errors import KdrunError, first_line
from kdrun.io import write_json
from kdrun.loop import predict
from kdrun.models.build import build_model
from kdrun.objectives import CachedLogits, OnlineTeacher
from kdrun.parts import DataPart, ObjectivePart, OutputsPart, RolePart, fold_recipe_overrides
from kdrun.preflight import check_buildable, check_inputs
from kdrun.run import save_config, save_model, target_name
from kdrun.sweep import is_fused
from kdrun.training import attach_objective, train_model

log = logging.getLogger("kdrun")


def preflight(cfg, overrides=()):
    transfer = check_inputs(cfg)
    check_student(fold_recipe_overrides(cfg, ["student"]), transfer["n"])
    check_val_size(cfg, transfer["n"])
    if uses_teacher(cfg):
        teacher.check(cfg, transfer, overrides)
    if is_fused(cfg):
        fused.check(cfg)


def check_val_size(cfg, n_train):
    if cfg.transfer.val_size >= n_train:
        raise KdrunError(f"transfer.val_size ({cfg.transfer.val_size}) must be smaller than the train split ({n_train})")


def check_student(cfg, n_rows=None):
    """The student's model, recipe and objective can be built, and fit the teacher's signal (`n_rows`:
    the train split's rows, for an objective that keeps state per row)."""
    found = check_buildable(cfg.dataset, [RolePart.of(cfg, "student")])
    if cfg.transfer.bias_correction:
        found["student"].require("transfer.bias_correction=true", bias=True)
    if cfg.student.recipe.get("val_size") and cfg.transfer.val_size:
        raise KdrunError("set transfer.val_size or student.recipe.val_size, not both: a distilled student's "
                         "validation split is transfer.val_size")
    need = needs(cfg)
    with_teacher, cached = need.teacher, need.teacher and not online(cfg)
    try:
        objective = instantiate(cfg.loss, teacher=CachedLogits(None) if with_teacher else None)
    except Exception as e:
        raise KdrunError(f"invalid loss config: {first_line(e.__cause__ or e)}") from None
    if need.online_teacher or need.student_features:
        check_features(cfg, objective, need, n_rows)
    if cfg.student.recipe.jitter and cached:
        raise KdrunError("student.recipe.jitter must be 0 with cached soft targets: they are the teacher's "
                         "outputs on unshifted inputs, and a shifted view would be paired with them "
                         "(transfer.augment=true runs the teacher on the shifted view instead)")
    if cfg.student.recipe.get("flip") and cached:
        raise KdrunError("student.recipe.flip must be false with cached soft targets: they are the teacher's "
                         "outputs on unflipped inputs (transfer.augment=true runs the teacher on the student's view)")
    if cfg.transfer.augment and not with_teacher:
        raise KdrunError("transfer.augment=true needs a teacher (alpha > 0)")
    if cfg.transfer.augment and not (cfg.student.recipe.jitter or cfg.student.recipe.get("flip")):
        raise KdrunError("transfer.augment=true needs student.recipe.jitter > 0 (or flip): the teacher sees the "
                         "student's jittered view, and without jitter that is the cached view")
    if not cfg.transfer.labels and (not with_teacher or need.labels):
        if "alpha" in cfg.loss:
            raise KdrunError(f"transfer.labels=false needs alpha=1 (the hard term needs labels), got alpha={cfg.alpha}")
        raise KdrunError(f"transfer.labels=false needs a loss that trains without labels; {target_name(cfg.loss)} "
                         "uses them (set loss.ce_weight=0)")


def check_features(cfg, objective, need, n_rows=None):
    """An objective that reads features: one teacher model (not an ensemble, whose members' features
    do not combine), stage names both models have, and shapes the objective can pair (its parameters
    are built once here on the meta device: no memory, no compute)."""
    if need.teacher_features and teacher.is_ensemble(cfg):
        raise KdrunError(f"{target_name(cfg.loss)} reads the teacher's features, which an ensemble "
                         "(teacher=ensemble) does not have; distil from one teacher")
    try:
        with torch.device("meta"):
            student = build_model(cfg.student.model, cfg.dataset.num_classes)
            if need.teacher_features:
                model = build_model(cfg.teacher.model, cfg.dataset.num_classes).eval()
                objective.teacher = OnlineTeacher(model, None, teacher_tap(cfg.teacher.model, model, need))
            attach_objective(cfg.student.model, student, objective, cfg.dataset.shape, n_rows)
    except KdrunError:
        raise
    except Exception as e:
        raise KdrunError(f"invalid loss config: {first_line(e.__cause__ or e)}") from None


def run(cfg, run_dir, label=None):
    if is_fused(cfg):
        return fused.run(cfg, run_dir)
    cfg = fold_recipe_overrides(cfg, ["student"])
    save_config(cfg, run_dir)
    source, student, objective = DataPart.of(cfg), RolePart.of(cfg, "student"), ObjectivePart.of(cfg)
    outputs = OutputsPart.of(cfg, run_dir)
    device = resolve_device(source.device)
    data = load_data(source, device)
    rows = select_rows(data.train.labels.cpu(), source.transfer, source.dataset.subset_seed)
    transfer_set = data.train.subset(rows.train, labelled=source.transfer.labels)
    taught_by = teacher.source(cfg, data.transfer) if objective.uses_teacher else None
    signal, info = teacher_signal(objective, taught_by, data, student.channels_last)
    extra = student_results(student, objective, source.transfer, label, rows, info)
    results, model = train_model(student, outputs, objective.build(teacher=signal), data, transfer_set, device, extra,
                                 val=rows.val_split(data.train))  # its errors logged each epoch, never trained on
    if source.transfer.bias_correction:
        results["bias_correction"] = correct_bias(source, student, outputs, model, data, rows)
        write_json(outputs.run_dir / "results.json", results)
    return results


def correct_bias(source, student, outputs, model, data, rows):
    """Tune one additive shift of the affected classes' logits on the validation split, report test
    errors before and after, and save the shifted model beside the trained one."""
    classes = affected_classes(source.transfer)
    val = rows.val_split(data.train)
    val_logits, test_logits = predict(model, val), predict(model, data.test)
    shift, val_after = bias.tune_shift(val_logits, val.labels, classes)
    test_after = bias.shift_logits(test_logits, classes, shift)
    unseen = unseen_classes(source.transfer, data.num_classes)
    on_unseen = torch.isin(data.test.labels, torch.tensor(unseen, device=data.test.device))
    out = {
        "classes": classes, "shift": shift, "n_val": len(val),
        "val_errors_before": bias.errors(val_logits, val.labels), "val_errors_after": val_after,
        "test_errors_before": bias.errors(test_logits, data.test.labels),
        "test_errors_after": bias.errors(test_after, data.test.labels),
        "unseen_classes": unseen, "n_test_unseen": int(on_unseen.sum()),  # test images of classes never trained on
        "test_errors_unseen_before": bias.errors(test_logits[on_unseen], data.test.labels[on_unseen]),
        "test_errors_unseen_after": bias.errors(test_after[on_unseen], data.test.labels[on_unseen]),
    }
    arch = student.arch
    bias.apply_shift(model, classes, shift, arch.get("head"))
    save_model(outputs.run_dir / "model_bias_corrected.pt", model, arch, outputs.dataset, data.num_classes,
               {"name": student.name, "role": "student", "bias_correction": out})
    log.info("bias correction: shift %+.1f on classes %s: val errors %d -> %d, test errors %d -> %d", shift, classes,
             out["val_errors_before"], val_after, out["test_errors_before"], out["test_errors_after"])
    return out
