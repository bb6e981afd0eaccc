"""Objectives: each maps (model, batch, progress) to (logits, loss, logs).

`logs` holds detached scalars to average per epoch (every loss term, T, alpha). One objective
per method, in its own module; the training loop knows nothing about methods. Every objective is an
nn.Module subclass of `Objective` (kdrun.objectives.base), declaring what it needs.
"""

from kdrun.objectives.attention import AttentionTransfer
from kdrun.objectives.base import Needs, Objective

from kdrun.objectives.cross_entropy import CrossEntropy
from kdrun.objectives.fitnet import FitNet
from kdrun.objectives.hinton import HintonKD
from kdrun.objectives.logit_matching import LogitMatching
from kdrun.objectives.mutual import MutualLearning
from kdrun.objectives.self_distillation import SelfDistillation
from kdrun.objectives.teachers import CachedLogits, OnlineTeacher

__all__ = ["AttentionTransfer", "FitNet", "Needs", "Objective", "CrossEntropy", "HintonKD", "LogitMatching", "MutualLearning", "SelfDistillation", "CachedLogits",
           "OnlineTeacher"]
