"""FitNets: hints from a teacher's intermediate layer (Romero, Ballas, Kahou, Chassang, Gatta and
Bengio, "FitNets: Hints for Thin Deep Nets", ICLR 2015).

The student's guided layer v (stage `student_stage`) is mapped by a regressor r onto the teacher's
hint layer u (stage `teacher_stage`), and the hint loss is the mean squared error

    hint = mean over batch, channels and positions of (r(v) - u)^2

(the paper writes 1/2 |u - r(v)|^2 summed; RepDistiller and mdistiller use the mean, nn.MSELoss, and
their hint weight 100 is tuned for it). The paper trains in two stages (the layers up to the guided one
on the hint alone, then the whole student by KD); this objective is the common single-stage form used
by RepDistiller and mdistiller:

    loss = ce_weight * CE(labels, student) + kd_weight * T^2 * KL(teacher_T || student_T)
           + hint_weight * hint

(kd_weight 0 by default: CE + 100 * hint, as both do). The regressor follows their ConvReg for
feature maps [B, C, H, W]: a 3x3 stride-2 conv when the student's map is twice the teacher's size, a
4x4 stride-2 transposed conv when it is half, else a conv of kernel (1 + Hs - Ht, 1 + Ws - Wt)
(1x1 at equal sizes), then BatchNorm and ReLU (`regressor_bn`, `regressor_relu`). For feature vectors
[B, D] it is a linear layer (then the same BatchNorm and ReLU). A student map smaller than the
teacher's, other than half, is refused, as those codes refuse it. The regressor is trained with the
student and saved in the training checkpoint, not in model.pt.
"""

import torch.nn.functional as F
from torch import nn

from kdrun.errors import KdrunError
from kdrun.objectives.base import Needs, Objective
from kdrun.objectives.feature_kd import check_weights, logit_terms


def hint_loss(regressed, hint):
    """Mean squared error between the regressed guided layer and the teacher's hint (shapes equal)."""
    if regressed.shape != hint.shape:
        raise ValueError(f"regressed guided layer {list(regressed.shape)} and hint {list(hint.shape)} differ")
    return F.mse_loss(regressed, hint)


def regressor(student_shape, teacher_shape, bn=True, relu=True):
    """The module mapping a student feature of `student_shape` ([B, C, H, W] or [B, D]) onto the
    teacher's `teacher_shape`; a KdrunError line for shapes it cannot map."""
    s, t = tuple(student_shape), tuple(teacher_shape)
    if len(s) == len(t) == 2:
        layers = [nn.Linear(s[1], t[1])] + ([nn.BatchNorm1d(t[1])] if bn else [])
    elif len(s) == len(t) == 4:
        (_, cs, hs, ws), (_, ct, ht, wt) = s, t
        if (hs, ws) == (2 * ht, 2 * wt):
            conv = nn.Conv2d(cs, ct, kernel_size=3, stride=2, padding=1)
        elif (2 * hs, 2 * ws) == (ht, wt):
            conv = nn.ConvTranspose2d(cs, ct, kernel_size=4, stride=2, padding=1)
        elif hs >= ht and ws >= wt:
            conv = nn.Conv2d(cs, ct, kernel_size=(1 + hs - ht, 1 + ws - wt))
        else:
            raise KdrunError(f"loss=fitnet: the student's guided layer is {hs}x{ws}, smaller than the teacher's "
                             f"hint {ht}x{wt} (and not half of it); pick stages whose maps are at least as large "
                             "in the student (loss.student_stage, loss.teacher_stage)")
        layers = [conv] + ([nn.BatchNorm2d(ct)] if bn else [])
    else:
        raise KdrunError(f"loss=fitnet: the student's guided layer has shape {list(s[1:])} and the teacher's hint "
                         f"{list(t[1:])}: both must be feature maps [C, H, W] or both vectors [D]")
    return nn.Sequential(*layers, *([nn.ReLU()] if relu else []))


class FitNet(Objective):
    """CE + hint_weight * MSE(regressor(student stage), teacher stage), optionally + Hinton KD (see the
    module docstring). The teacher runs online on the student's batch; `lr` is the regressor's own
    learning rate (null: the student's)."""

    uses_teacher = True

    def __init__(self, temperature, teacher=None, teacher_stage="s1", student_stage="s1", hint_weight=100.0,
                 ce_weight=1.0, kd_weight=0.0, regressor_bn=True, regressor_relu=True, lr=None):
        super().__init__(lr=lr)
        if teacher is None:
            raise ValueError("FitNet needs a teacher")
        check_weights(hint_weight=hint_weight, ce_weight=ce_weight, kd_weight=kd_weight)
        self.temperature, self.teacher = temperature, teacher
        self.teacher_stage, self.student_stage = str(teacher_stage), str(student_stage)
        self.teacher_features, self.student_features = (self.teacher_stage,), (self.student_stage,)
        self.hint_weight, self.ce_weight, self.kd_weight = float(hint_weight), float(ce_weight), float(kd_weight)
        self.regressor_bn, self.regressor_relu = bool(regressor_bn), bool(regressor_relu)
        self.regressor = None

    @classmethod
    def needs(cls, cfg=None):
        get = cfg.get if cfg is not None else {}.get
        return Needs(teacher=True, teacher_features=(str(get("teacher_stage", "s1")),),
                     student_features=(str(get("student_stage", "s1")),), labels=float(get("ce_weight", 1.0)) > 0)

    def attach(self, tap, example):
        super().attach(tap, example)
        s = self.student_shapes(example)[self.student_stage]
        t = self.teacher_shapes(example)[self.teacher_stage]
        self.regressor = regressor(s, t, self.regressor_bn, self.regressor_relu).to(example.device)

    def forward(self, model, batch, progress):
        T = self.temperature(progress)
        logits, feats = self.student_outputs(model, batch.x)
        teacher_logits, teacher_feats = self.teacher.outputs(batch)
        hint = hint_loss(self.regressor(feats[self.student_stage]), teacher_feats[self.teacher_stage])
        loss, logs = logit_terms(logits, teacher_logits, batch.y, T, self.ce_weight, self.kd_weight)
        return logits, loss + self.hint_weight * hint, {**logs, "hint": hint.detach(), "T": T}
