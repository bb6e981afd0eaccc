"""Objectives: each maps (model, batch, progress) to (logits, loss, logs).

`logs` holds detached scalars to average per epoch (every loss term, T, alpha). One objective
per method, in its own module; the training loop knows nothing about methods.
"""

from kdrun.objectives.cross_entropy import CrossEntropy
from kdrun.objectives.hinton import HintonKD
from kdrun.objectives.logit_matching import LogitMatching
from kdrun.objectives.mutual import MutualLearning
from kdrun.objectives.self_distillation import SelfDistillation
from kdrun.objectives.teachers import CachedLogits, OnlineTeacher

__all__ = ["CrossEntropy", "HintonKD", "LogitMatching", "MutualLearning", "SelfDistillation", "CachedLogits",
           "OnlineTeacher"]
