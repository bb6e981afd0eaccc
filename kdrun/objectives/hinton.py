from kdrun.losses import hinton_loss
from kdrun.objectives.base import Objective, alpha_needs
from kdrun.objectives.checks import flag


class HintonKD(Objective):
    """alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * CE(labels, student_1).

    `temperature` and `alpha` are schedules (callables of training progress); `teacher` gives the
    teacher's logits for a batch, and is None when alpha is always 0 (the student alone). Logits
    suffice: the soft-target cache serves it. standardize: the soft term compares z-scored logits
    (logit standardisation, Sun et al. 2024).
    """

    uses_teacher = True

    def __init__(self, temperature, alpha, teacher=None, standardize=False):
        super().__init__()
        if teacher is None and not alpha.is_zero():
            raise ValueError("HintonKD needs a teacher unless alpha is 0")
        self.temperature, self.alpha, self.teacher = temperature, alpha, teacher
        self.standardize = flag("standardize", standardize)

    @classmethod
    def needs(cls, cfg=None):
        return alpha_needs(cfg)

    def forward(self, model, batch, progress):
        T, alpha = self.temperature(progress), self.alpha(progress)
        logits = model(batch.x)
        teacher_logits = self.teacher(batch, T) if self.teacher is not None else None
        loss, parts = hinton_loss(logits, teacher_logits, batch.y, T, alpha, self.standardize)
        return logits, loss, {**parts, "T": T, "alpha": alpha}
