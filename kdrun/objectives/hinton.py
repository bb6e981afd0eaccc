import torch.nn.functional as F

from kdrun.losses import hinton_loss


class HintonKD:
    """alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * CE(labels, student_1).

    `temperature` and `alpha` are schedules (callables of training progress); `teacher` gives the
    teacher's logits for a batch and may be None when alpha is always 0 (the student alone).
    """

    def __init__(self, temperature, alpha, teacher=None):
        self.temperature, self.alpha, self.teacher = temperature, alpha, teacher
        if teacher is None and not self.alpha.is_zero():
            raise ValueError("HintonKD needs a teacher unless alpha is 0")

    @property
    def needs_teacher(self):
        return not self.alpha.is_zero()

    def __call__(self, model, batch, progress):
        T, alpha = self.temperature(progress), self.alpha(progress)
        logits = model(batch.x)
        if self.teacher is None:
            loss = F.cross_entropy(logits, batch.y)
            return logits, loss, {"ce": loss.detach()}
        loss, parts = hinton_loss(logits, self.teacher(batch), batch.y, T, alpha)
        return logits, loss, {**parts, "T": T, "alpha": alpha}
