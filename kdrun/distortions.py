"""Random distortions of a batch, on its device: the two views of data-distortion guided
self-distillation (Xu & Liu 2019). Each view draws its own shifts, flips, noise and erased patches."""

import torch

from kdrun.data.batches import random_flip, random_shift, to_device


class Distortions:
    """shift: up to this many pixels each way, zero (black) fill, i.e. a padded random crop;
    flip: mirror half the images left-right (not for digits); noise: std of Gaussian pixel noise,
    pixels in [0, 1], clipped; erase: probability of blacking out one random rectangle per image
    (random erasing, Zhong et al. 2020: 2-33% of the area, aspect ratio 0.3-3.3)."""

    def __init__(self, shift=2, flip=False, noise=0.0, erase=0.0):
        if int(shift) != shift or shift < 0:
            raise ValueError(f"shift must be an integer >= 0, got {shift!r}")
        if noise < 0:
            raise ValueError(f"noise must be >= 0, got {noise!r}")
        if not 0 <= erase <= 1:
            raise ValueError(f"erase must be in [0, 1], got {erase!r}")
        self.shift, self.flip, self.noise, self.erase = int(shift), bool(flip), float(noise), float(erase)

    def describe(self):
        parts = [f"{self.shift}px shift" if self.shift else None, "flip" if self.flip else None,
                 f"noise {self.noise:g}" if self.noise else None, f"erase p={self.erase:g}" if self.erase else None]
        return "2 views: " + (", ".join(filter(None, parts)) or "undistorted")

    def __call__(self, x, pixels, generator):
        """A distorted view of normalised inputs x; `pixels` converts to [0, 1] and back (DeviceData)."""
        x = pixels.to_unit(x)
        if self.shift:
            x = random_shift(x, self.shift, generator)
        if self.flip:
            x = random_flip(x, generator)
        if self.noise:
            noise = to_device(torch.randn(x.shape, generator=generator), x.device)
            x = (x + self.noise * noise).clamp_(0, 1)
        if self.erase:
            x = random_erase(x, self.erase, generator)
        return pixels.normalize(x)


def random_erase(x, p, generator, scale=(0.02, 0.33), ratio=(0.3, 3.3)):
    """Black out one rectangle in each image with probability p (area and aspect ratio drawn per image)."""
    b, _, h, w = x.shape
    u = torch.rand(5, b, generator=generator)
    area = h * w * (scale[0] + (scale[1] - scale[0]) * u[0])
    aspect = torch.exp(torch.log(torch.tensor(ratio[0])) + torch.log(torch.tensor(ratio[1] / ratio[0])) * u[1])
    eh = (area * aspect).sqrt().round().clamp(1, h)
    ew = (area / aspect).sqrt().round().clamp(1, w)
    top = ((h - eh + 1) * u[2]).floor()
    left = ((w - ew + 1) * u[3]).floor()
    on = u[4] < p
    rows = torch.arange(h)[None, :]
    cols = torch.arange(w)[None, :]
    in_rows = (rows >= top[:, None]) & (rows < (top + eh)[:, None])
    in_cols = (cols >= left[:, None]) & (cols < (left + ew)[:, None])
    mask = to_device(in_rows[:, :, None] & in_cols[:, None, :] & on[:, None, None], x.device)
    return x.masked_fill(mask[:, None], 0.0)
