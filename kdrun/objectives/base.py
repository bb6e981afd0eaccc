"""What every objective is and declares.

An objective is an `nn.Module` called by the training loop as

    logits, loss, logs = objective(model, batch, progress)

(`forward(self, model, batch, progress)`): `model` is the network being trained (under torchrun its
DistributedDataParallel wrapper), `batch` a Batch(x, y, idx) (y None on an unlabelled transfer set),
`progress` the share of training steps done, in [0, 1). It returns the student's logits for the batch
(train accuracy counts them), the scalar loss to backpropagate, and `logs`: detached scalars averaged
per epoch into metrics.jsonl (every loss term, T, ...).

Before it is built, an objective declares what it needs, so that a command gives it that and no more
(`needs(cfg)`, a classmethod reading the objective's own config node, defaulting to the class
attributes below):

- `uses_teacher`: whether it reads a teacher at all. If so the command passes `teacher=`, a callable
  `teacher(batch, T=None) -> logits`: the soft-target cache (CachedLogits) when logits suffice, or
  the teacher run on the student's very batch (OnlineTeacher) otherwise.
- `teacher_features`: names of teacher stages it reads (a stage of the teacher's model config's
  `features:` map, a module path of the teacher, or "penultimate", the head's input). Non-empty: the
  teacher runs online and `teacher.outputs(batch)` gives (logits, {name: tensor}).
- `student_features`: the same for the student. fit_role then hands the objective a FeatureTap on
  the student (`attach`), and `self.student_outputs(model, x)` gives (logits, {name: tensor}).
- `labels`: whether it needs labels (False lets it train on an unlabelled transfer set).
- `uses_rows`: whether it keeps state per row of the train split (a memory bank indexed by `batch.idx`).
  If so the command passes `attach(..., n_rows=)`, the number of rows of the whole train split.

Parameters an objective owns (a regressor, a projection head) are created in `attach`, which runs
before the optimiser is built: they are trained with the student (in their own param group, at
`self.lr` when it is not None), saved in the training checkpoint with every buffer and extra state
(`state_dict()`) and restored on resume, and never written to model.pt. Under torchrun their
gradients are averaged over the processes like the model's.

A minimal objective (the student's cross-entropy plus an L2 pull of its penultimate features towards
the teacher's through a learned linear map):

    class FeatureL2(Objective):
        uses_teacher = True
        teacher_features = student_features = ("penultimate",)

        def __init__(self, teacher=None, weight=1.0, lr=None):
            super().__init__(lr=lr)
            self.teacher, self.weight, self.proj = teacher, float(weight), None

        def attach(self, tap, example):
            super().attach(tap, example)
            s = self.student_shapes(example)["penultimate"]
            t = self.teacher_shapes(example)["penultimate"]
            self.proj = nn.Linear(s[1], t[1])

        def forward(self, model, batch, progress):
            logits, feats = self.student_outputs(model, batch.x)
            _, teacher_feats = self.teacher.outputs(batch)
            l2 = (self.proj(feats["penultimate"]) - teacher_feats["penultimate"]).pow(2).mean()
            ce = F.cross_entropy(logits, batch.y)
            return logits, ce + self.weight * l2, {"ce": ce.detach(), "l2": l2.detach()}
"""

from dataclasses import dataclass

import torch
from torch import nn

from kdrun.data.batches import Batch
from kdrun.errors import KdrunError


@dataclass(frozen=True)
class Needs:
    """What an objective needs from the command that runs it."""

    teacher: bool = False
    teacher_features: tuple = ()
    student_features: tuple = ()
    labels: bool = True

    @property
    def online_teacher(self):
        """Whether the teacher must run on the student's very batch (it gives features, not only logits)."""
        return bool(self.teacher_features)


class Objective(nn.Module):
    """Base class of kdrun's objectives (see the module docstring)."""

    uses_teacher = False
    teacher_features = ()
    student_features = ()
    labels = True
    uses_rows = False

    def __init__(self, lr=None):
        super().__init__()
        if lr is not None and (isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr > 0):
            raise ValueError(f"lr must be a number > 0 or null, got {lr!r}")
        self.lr = None if lr is None else float(lr)
        self.tap = None

    @classmethod
    def needs(cls, cfg=None):
        """What this objective, configured by `cfg` (its config node; None: the defaults), needs.
        Override it when a need depends on the configuration (HintonKD: a teacher unless alpha is 0)."""
        return Needs(bool(cls.uses_teacher), tuple(cls.teacher_features), tuple(cls.student_features), bool(cls.labels))

    # ------------------------------------------------------------------ set up before training

    def attach(self, tap, example, n_rows=None):
        """Called once before the optimiser is built, with a FeatureTap on the student (or None when the
        objective declares no student features) and an example input batch (a few inputs of the data's
        shape, on the student's device, possibly the meta device): create owned parameters here.
        `n_rows` (given only to an objective whose `uses_rows` is true): the number of rows of the whole
        train split, which `batch.idx` indexes."""
        self.tap = tap

    def param_groups(self):
        """The optimiser param groups of the objective's own parameters ([] when it has none)."""
        own = [p for p in self.parameters() if p.requires_grad]
        if not own:
            return []
        return [{"params": own} if self.lr is None else {"params": own, "lr": self.lr}]

    # ------------------------------------------------------------------ helpers for forward

    def student_outputs(self, model, x):
        """(logits, {stage: output}) of one forward of the student on x. Called before `attach` (a
        test, or a caller of its own), an objective that reads only "penultimate" taps `model` itself."""
        if self.tap is None and set(self.student_features) <= {"penultimate"}:
            from torch.nn.parallel import DistributedDataParallel

            from kdrun.models.features import FeatureTap

            self.tap = FeatureTap(model.module if isinstance(model, DistributedDataParallel) else model, {})
        if self.tap is None:
            raise KdrunError(f"{type(self).__name__} reads student features but was given no FeatureTap "
                             "(objective.attach was not called)")
        with self.tap.capture() as feats:
            logits = model(x)
        return logits, dict(feats)

    @torch.no_grad()
    def student_shapes(self, example):
        """{stage: output shape} of the student on `example` (eval mode, no gradient, no random draw)."""
        model = self.tap.model
        was_training = model.training
        model.eval()
        try:
            _, feats = self.student_outputs(model, example)
        finally:
            model.train(was_training)
        return {name: tuple(v.shape) for name, v in feats.items()}

    def teacher_shapes(self, example):
        """{stage: output shape} of the teacher on `example`."""
        return teacher_shapes(self.teacher, example)


@torch.no_grad()
def teacher_shapes(teacher, example):
    """{stage: output shape} of a teacher signal with features (OnlineTeacher, CachedFeatures) on the
    inputs `example` (their rows' positions taken as 0)."""
    idx = torch.zeros(example.shape[0], dtype=torch.long, device=example.device)
    _, feats = teacher.outputs(Batch(example, None, idx), fresh=True)
    return {name: tuple(v.shape) for name, v in feats.items()}


def alpha_needs(cfg):
    """The needs of an objective weighted by the top-level alpha schedule (its config's `alpha`): a
    teacher unless alpha is 0 throughout, labels unless it is 1 throughout."""
    from hydra.utils import instantiate

    if cfg is None:
        return Needs(teacher=True)
    alpha = instantiate(cfg.alpha)
    return Needs(teacher=not alpha.is_zero(), labels=not (alpha(0.0) == 1 and alpha(1.0) == 1))


def needs_of(node):
    """The Needs of the objective a config node (`loss`, with `_target_`) builds."""
    from hydra.utils import get_class

    target = node.get("_target_") if hasattr(node, "get") else None
    try:
        cls = get_class(target)
    except Exception:
        raise KdrunError(f"invalid loss config: cannot import _target_ {target!r}") from None
    if isinstance(cls, type) and issubclass(cls, Objective):
        return cls.needs(node)
    return Needs(teacher=True)  # a loss that declares nothing is given the teacher's logits
