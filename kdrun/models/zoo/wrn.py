"""Wide ResNets (Zagoruyko & Komodakis 2016) for CIFAR: pre-activation basic blocks (BN-ReLU-conv
twice), a 1x1 projection where the channel count changes, widths [16, 16k, 32k, 64k], depth = 6n + 4,
a final BN-ReLU before global average pooling."""

import torch
from torch import nn

from kdrun.models.zoo.layers import init_kaiming


class PreActBlock(nn.Module):
    def __init__(self, c_in, c_out, stride):
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(c_in), nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn2, self.conv2 = nn.BatchNorm2d(c_out), nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.relu = nn.ReLU()
        # With a projection the shortcut starts from the activated input, as in the authors' code.
        self.projection = None if c_in == c_out and stride == 1 else nn.Conv2d(c_in, c_out, 1, stride, bias=False)

    def forward(self, x):
        activated = self.relu(self.bn1(x))
        out = self.conv2(self.relu(self.bn2(self.conv1(activated))))
        return out + (x if self.projection is None else self.projection(activated))


class WideResNet(nn.Module):
    """Stages `block1`..`block3`, pooled features `pool`, head `fc`."""

    def __init__(self, num_classes, depth=16, widen=1, in_channels=3):
        super().__init__()
        if int(depth) != depth or depth < 10 or (depth - 4) % 6:
            raise ValueError(f"depth must be 6n+4 (10, 16, 22, 28, 40, ...), got {depth}")
        n, k = (int(depth) - 4) // 6, int(widen)
        self.conv1 = nn.Conv2d(int(in_channels), 16, 3, 1, 1, bias=False)
        c_in, stages = 16, []
        for i, width in enumerate((16 * k, 32 * k, 64 * k)):
            blocks = [PreActBlock(c_in if b == 0 else width, width, 2 if i > 0 and b == 0 else 1) for b in range(n)]
            stages.append(nn.Sequential(*blocks))
            c_in = width
        self.block1, self.block2, self.block3 = stages
        self.pool = nn.Sequential(nn.BatchNorm2d(c_in), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(c_in, num_classes)
        init_kaiming(self)

    def forward(self, x: torch.Tensor):
        return self.fc(self.pool(self.block3(self.block2(self.block1(self.conv1(x))))))


def wrn(num_classes, depth=16, widen=1, in_channels=3):
    return WideResNet(num_classes, depth, widen, in_channels)
