"""ShuffleNet V1 (Zhang et al. 2018, groups 3) and V2 (Ma et al. 2018, size 1x) in the CIFAR form of the
distillation benchmark: a 1x1 stem of 24 channels at full resolution, three stages that halve the
resolution at their first block, global average pooling, one linear layer."""

import torch
import torch.nn.functional as F
from torch import nn

from kdrun.models.zoo.layers import ChannelShuffle, conv_bn, init_kaiming


class V1Unit(nn.Module):
    """Grouped 1x1 conv, channel shuffle, depthwise 3x3, grouped 1x1 conv; a stride-2 unit concatenates
    an average-pooled shortcut, the others add the identity. The first unit after the stem uses no groups
    in its first conv (24 channels do not split into 3 groups the way the paper intends)."""

    def __init__(self, c_in, c_out, stride, groups):
        super().__init__()
        mid = c_out // 4
        first_groups = 1 if c_in == 24 else groups
        self.conv1 = conv_bn(c_in, mid, 1, groups=first_groups)
        self.shuffle = ChannelShuffle(first_groups)
        self.conv2 = conv_bn(mid, mid, 3, stride, groups=mid)
        self.conv3 = conv_bn(mid, c_out, 1, groups=groups, relu=False)
        self.shortcut = nn.AvgPool2d(3, stride=2, padding=1) if stride == 2 else None

    def forward(self, x):
        out = self.conv3(self.conv2(self.shuffle(self.conv1(x))))
        out = out + x if self.shortcut is None else torch.cat([out, self.shortcut(x)], 1)
        return F.relu(out)


class ShuffleNetV1(nn.Module):
    """Stages `layer1`..`layer3`, pooled features `pool`, head `linear`."""

    def __init__(self, num_classes, widths=(240, 480, 960), blocks=(4, 8, 4), groups=3, in_channels=3):
        super().__init__()
        self.stem = conv_bn(int(in_channels), 24, 1)
        c_in, stages = 24, []
        for width, n in zip(widths, blocks):
            # the stride-2 unit's own output is concatenated with its input: it makes width - c_in channels
            units = [V1Unit(c_in, width - c_in, 2, groups)] + [V1Unit(width, width, 1, groups) for _ in range(n - 1)]
            stages.append(nn.Sequential(*units))
            c_in = width
        self.layer1, self.layer2, self.layer3 = stages
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.linear = nn.Linear(c_in, num_classes)
        init_kaiming(self)

    def forward(self, x):
        return self.linear(self.pool(self.layer3(self.layer2(self.layer1(self.stem(x))))))


class V2Unit(nn.Module):
    """Half the channels pass through, the other half go 1x1 conv, depthwise 3x3, 1x1 conv; then a shuffle."""

    def __init__(self, channels):
        super().__init__()
        half = channels // 2
        self.branch = nn.Sequential(conv_bn(half, half, 1), conv_bn(half, half, 3, groups=half, relu=False),
                                    conv_bn(half, half, 1))
        self.shuffle = ChannelShuffle(2)

    def forward(self, x):
        kept, through = x.chunk(2, dim=1)
        return self.shuffle(torch.cat([kept, self.branch(through)], 1))


class V2Down(nn.Module):
    """Both branches see the whole input at stride 2 and make half the output channels each."""

    def __init__(self, c_in, c_out):
        super().__init__()
        half = c_out // 2
        self.left = nn.Sequential(conv_bn(c_in, c_in, 3, 2, groups=c_in, relu=False), conv_bn(c_in, half, 1))
        self.right = nn.Sequential(conv_bn(c_in, half, 1), conv_bn(half, half, 3, 2, groups=half, relu=False),
                                   conv_bn(half, half, 1))
        self.shuffle = ChannelShuffle(2)

    def forward(self, x):
        return self.shuffle(torch.cat([self.left(x), self.right(x)], 1))


class ShuffleNetV2(nn.Module):
    """Stages `layer1`..`layer3`, pooled features `pool`, head `linear`."""

    def __init__(self, num_classes, widths=(116, 232, 464), blocks=(3, 7, 3), last=1024, in_channels=3):
        super().__init__()
        self.stem = conv_bn(int(in_channels), 24, 1)
        c_in, stages = 24, []
        for width, n in zip(widths, blocks):
            stages.append(nn.Sequential(V2Down(c_in, width), *[V2Unit(width) for _ in range(n)]))
            c_in = width
        self.layer1, self.layer2, self.layer3 = stages
        self.pool = nn.Sequential(conv_bn(c_in, last, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.linear = nn.Linear(last, num_classes)
        init_kaiming(self)

    def forward(self, x):
        return self.linear(self.pool(self.layer3(self.layer2(self.layer1(self.stem(x))))))


def shufflenetv1(num_classes, in_channels=3):
    return ShuffleNetV1(num_classes, in_channels=in_channels)


def shufflenetv2(num_classes, in_channels=3):
    return ShuffleNetV2(num_classes, in_channels=in_channels)
