"""Where a distillation objective gets the teacher's logits for a batch, at the objective's T (an
ensemble's combined logits depend on T; one teacher's do not; T=None is the high-T limit)."""

import math

import torch

from kdrun.ensemble import combine_logits


class CachedLogits:
    """Teacher logits computed once over the transfer set; a batch looks its rows up by index.
    An ensemble's cache holds every member's logits, [N, M, C], combined per batch by `combine`."""

    def __init__(self, logits, combine=None):
        self.logits, self.combine = logits, combine

    def __call__(self, batch, T=None):
        z = self.logits.index_select(0, batch.idx)
        return z if self.combine is None else combine_logits(z, self.combine, T)


class OnlineTeacher:
    """The teacher run on the very batch the student sees (its jittered view): consistent targets
    (Beyer et al. 2022), at the price of a teacher forward pass per step. With a FeatureTap on the
    teacher, `outputs(batch)` also gives the teacher's named features on that batch; one forward per
    batch serves both (the last batch's outputs are kept)."""

    def __init__(self, model, combine=None, tap=None):
        self.model, self.combine, self.tap = model.eval(), combine, tap
        self.last = (None, None)

    def __call__(self, batch, T=None):
        if self.tap is not None:
            return self.outputs(batch)[0]
        with torch.no_grad():
            if self.combine is None:
                return self.model(batch.x)
            return combine_logits(self.model.member_logits(batch.x), self.combine, T)

    def outputs(self, batch, fresh=False):
        """(logits, {stage: output}) of the teacher on `batch`, without gradients."""
        if self.tap is None:
            raise ValueError("this teacher was given no FeatureTap: it gives logits only")
        last_batch, out = self.last
        if fresh or batch is not last_batch:
            with torch.no_grad(), self.tap.capture() as feats:
                logits = self.model(batch.x)
            out = (logits, dict(feats))
            self.last = (None, None) if fresh else (batch, out)
        return out


class CachedFeatures:
    """The teacher's logits and named features over a whole split, computed once (eval mode, the
    unshifted inputs) and looked up per batch by row, as CachedLogits does for logits: what an
    OnlineTeacher gives a feature objective, without a teacher forward per step. Only for batches the
    teacher would see unchanged (no jitter, no flip)."""

    combine = None

    def __init__(self, logits, features):
        self.logits, self.features = logits, features

    @classmethod
    @torch.no_grad()
    def of(cls, online, split, batch_size=1000):
        """Run `online` (an OnlineTeacher with a FeatureTap) over `split` (a whole split, which batch.idx
        indexes) in order, one pass."""
        if getattr(split, "rows", None) is not None:
            raise ValueError("CachedFeatures.of needs a whole split (batch.idx indexes it), not a subset")
        logits, features = [], {}
        for batch in split.batches(batch_size):
            z, feats = online.outputs(batch, fresh=True)
            logits.append(z)
            for name, value in feats.items():
                features.setdefault(name, []).append(value.contiguous())
        return cls(torch.cat(logits), {name: torch.cat(parts) for name, parts in features.items()})

    @staticmethod
    def nbytes(shapes, n_rows):
        """Bytes of the cache of `n_rows` rows, given the teacher's {name: output shape} (float32)."""
        return 4 * n_rows * sum(math.prod(shape[1:]) for shape in shapes.values())

    def __call__(self, batch, T=None):
        return self.logits.index_select(0, batch.idx)

    def outputs(self, batch, fresh=False):
        """(logits, {stage: output}) of the teacher on `batch`'s rows."""
        return self(batch), {name: value.index_select(0, batch.idx) for name, value in self.features.items()}


class OncePerBatch:
    """A teacher signal asked for the same batch by several students (a fused sweep) computes it once
    (once per T for an ensemble, whose combined logits depend on T)."""

    def __init__(self, signal):
        self.signal, self.last = signal, (None, None, None)

    def __call__(self, batch, T=None):
        last_batch, last_T, logits = self.last
        if batch is not last_batch or (self.signal.combine is not None and T != last_T):
            logits = self.signal(batch, T)
            self.last = (batch, T, logits)
        return logits
