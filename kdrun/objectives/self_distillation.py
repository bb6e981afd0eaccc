import torch
import torch.nn.functional as F

from kdrun.losses import mmd, symmetric_kl
from kdrun.objectives.base import Objective


class SelfDistillation(Objective):
    """Data-distortion guided self-distillation (Xu & Liu 2019): one network sees two distorted views
    a and b of each batch, and
        loss = CE(a) + CE(b) + lam * [KL(p_a || p_b) + KL(p_b || p_a)] + mu * MMD(f_a, f_b),
    p at temperature T, f the penultimate features (the head's input). No T^2 factor: this is the
    paper's form, for which the reference weights (lam 1, T 3) were given. Both views go through the
    network as one batch. detach_targets: each KL direction holds its target view fixed. The views'
    generator is the module's extra state: the training checkpoint keeps it, for an exact resume."""

    student_features = ("penultimate",)

    def __init__(self, temperature, lam, mu, distortions, pixels, mmd_kernel="linear", bandwidth=None, seed=0,
                 detach_targets=False):
        super().__init__()
        if lam < 0 or mu < 0:
            raise ValueError(f"lam and mu must be >= 0, got lam={lam}, mu={mu}")
        if bandwidth is not None and (isinstance(bandwidth, bool) or not isinstance(bandwidth, (int, float))
                                      or not bandwidth > 0):
            raise ValueError(f"bandwidth must be a number > 0 or null, got {bandwidth!r}")
        mmd(torch.zeros(2, 1), torch.zeros(2, 1), mmd_kernel)  # refuse an unknown kernel now
        self.temperature, self.lam, self.mu = temperature, float(lam), float(mu)
        self.distortions, self.pixels = distortions, pixels
        self.kernel, self.bandwidth, self.detach_targets = mmd_kernel, bandwidth, bool(detach_targets)
        self.generator = torch.Generator().manual_seed(int(seed) + 1)  # not the data order's stream

    def get_extra_state(self):
        return {"generator": self.generator.get_state()}

    def set_extra_state(self, state):
        self.generator.set_state(state["generator"])

    def views(self, x):
        return self.distortions(x, self.pixels, self.generator), self.distortions(x, self.pixels, self.generator)

    def forward(self, model, batch, progress):
        T = self.temperature(progress)
        a, b = self.views(batch.x)
        logits, feats = self.student_outputs(model, torch.cat([a, b]))
        features = feats["penultimate"]
        n = batch.x.shape[0]
        (za, zb), (fa, fb) = logits.split(n), features.split(n)
        ce_a, ce_b = F.cross_entropy(za, batch.y), F.cross_entropy(zb, batch.y)
        kl = symmetric_kl(za, zb, T, self.detach_targets)
        discrepancy = mmd(fa, fb, self.kernel, self.bandwidth)
        loss = ce_a + ce_b + self.lam * kl + self.mu * discrepancy
        return za, loss, {"ce_a": ce_a.detach(), "ce_b": ce_b.detach(), "sym_kl": kl.detach(),
                          "mmd": discrepancy.detach(), "T": T}
