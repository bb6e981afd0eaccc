"""Bias correction (Hinton et al. 2015, section 3): a student whose transfer set left classes out
(or held only some) gets their output biases wrong. One additive shift of those classes' logits is
tuned on a validation split carved from the training data, never on the test set."""

import torch

from kdrun.models import capabilities

GRID = torch.arange(-200, 201, dtype=torch.float64) / 10  # -20.0 .. 20.0 by 0.1; the paper used +3.5 and -7.6


def shift_logits(logits, classes, shift):
    out = logits.clone()
    out[:, classes] += shift
    return out


def errors(logits, labels):
    return int((logits.argmax(1) != labels).sum())


def tune_shift(logits, labels, classes, grid=GRID):
    """The shift of `classes`' logits with the fewest errors on (logits, labels). Of equally good
    shifts the middle one is taken: the centre of the best range, not its edge, and 0 when the
    data say nothing. Returns (shift, errors at that shift)."""
    logits, labels = logits.float().cpu(), labels.cpu()
    counts = torch.tensor([errors(shift_logits(logits, classes, float(s)), labels) for s in grid])
    best = counts.min()
    candidates = grid[counts == best]  # ascending, as the grid is
    return round(float(candidates[len(candidates) // 2]), 6), int(best)


@torch.no_grad()
def apply_shift(model, classes, shift, head_path=None):
    """Fold the shift into the bias of the model's head (its final nn.Linear), so the saved model carries it."""
    capabilities.head_bias(model, head_path)[classes] += shift
