"""The student's training set: which rows of the train split it learns from (see `transfer` in
conf/base.yaml). Rows keep their positions in the train split, so cached teacher logits still pair."""

from dataclasses import dataclass

import torch

from kdrun.data.sources import stratified_subset
from kdrun.errors import KdrunError


@dataclass
class TransferRows:
    train: torch.Tensor  # positions in the train split the student learns from
    val: torch.Tensor  # positions carved out for validation (empty when val_size is 0)

    def val_split(self, split):
        """The validation rows of `split` (the whole train split), or None when none were carved."""
        return split.subset(self.val) if self.val.numel() else None


def select_rows(labels, transfer, seed):
    """Carve the validation split first (stratified over all classes), then filter the rest by class,
    then keep a stratified `fraction` of it. Deterministic for a seed."""
    n = labels.numel()
    if transfer.val_size >= n:
        raise KdrunError(f"transfer.val_size ({transfer.val_size}) must be smaller than the train split ({n})")
    val = stratified_subset(labels, transfer.val_size, seed) if transfer.val_size else torch.empty(0, dtype=torch.long)
    keep = torch.ones(n, dtype=torch.bool)
    keep[val] = False
    if transfer.only_classes:
        keep &= torch.isin(labels, torch.tensor(list(transfer.only_classes)))
    if transfer.exclude_classes:
        keep &= ~torch.isin(labels, torch.tensor(list(transfer.exclude_classes)))
    rows = keep.nonzero().squeeze(1)
    if rows.numel() == 0:
        raise KdrunError(f"the transfer set is empty: {describe(transfer)} leaves no training examples")
    if transfer.fraction < 1:
        size = max(1, round(transfer.fraction * rows.numel()))
        rows = rows[stratified_subset(labels[rows], size, seed)]
    return TransferRows(rows, val)


def unseen_classes(transfer, num_classes):
    """The classes the transfer set holds no examples of."""
    if transfer.only_classes:
        return [c for c in range(num_classes) if c not in transfer.only_classes]
    return sorted(transfer.exclude_classes)


def affected_classes(transfer):
    """The classes whose output bias is shifted by bias correction: those the transfer set leaves
    out, or those it keeps when it holds only some."""
    return sorted(transfer.exclude_classes) if transfer.exclude_classes else sorted(transfer.only_classes)


def describe(transfer):
    """What a non-default transfer set holds ('without 3', 'only 7, 8', '3%'), or None."""
    parts = []
    if transfer.exclude_classes:
        parts.append("without " + ", ".join(map(str, sorted(transfer.exclude_classes))))
    if transfer.only_classes:
        parts.append("only " + ", ".join(map(str, sorted(transfer.only_classes))))
    if transfer.fraction < 1:
        parts.append(f"{transfer.fraction * 100:.6g}%")
    return "; ".join(parts) or None


def check_held_out(what, size, n):
    """A validation split of `size` leaves some of the `n` examples it is carved from to train on."""
    if size and size >= n:
        raise KdrunError(f"{what} ({size}) must be smaller than the examples it is carved from ({n})")


def held_out(split, size, seed, what="recipe.val_size"):
    """(the rest, a validation split): `size` examples of `split` carved out stratified by class and
    drawn with `seed`, as select_rows carves transfer.val_size from the whole train split (same size,
    same seed: the same rows)."""
    n = len(split)
    check_held_out(what, size, n)
    val = stratified_subset(split.labels.cpu(), size, seed)
    keep = torch.ones(n, dtype=torch.bool)
    keep[val] = False
    return split.subset(keep.nonzero().squeeze(1), labelled=split.labelled), split.subset(val)
