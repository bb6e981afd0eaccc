"""MobileNetV2 (Sandler et al. 2018) in the CIFAR form of the distillation benchmark: a stride-2 3x3
stem, seven stages of inverted residual blocks (expansion t, linear bottleneck; the t=1 stage keeps its
1x1 expansion conv), a 1x1 conv to 1280 channels, global average pooling, one linear layer. The
benchmark's student is width 0.5 with t=6 (`mobile_half`)."""

from torch import nn

from kdrun.models.zoo.layers import conv_bn, init_kaiming

STAGES = ((1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
          (6, 320, 1, 1))  # (expansion, channels, blocks, first stride); expansions other than 1 are `expansion`


class InvertedResidual(nn.Module):
    def __init__(self, c_in, c_out, stride, expansion):
        super().__init__()
        hidden = c_in * expansion
        self.conv = nn.Sequential(conv_bn(c_in, hidden, 1), conv_bn(hidden, hidden, 3, stride, groups=hidden),
                                  conv_bn(hidden, c_out, 1, relu=False))
        self.residual = stride == 1 and c_in == c_out

    def forward(self, x):
        return x + self.conv(x) if self.residual else self.conv(x)


class MobileNetV2(nn.Module):
    """Stages `stage1`..`stage7`, pooled features `pool`, head `classifier`."""

    def __init__(self, num_classes, width=0.5, expansion=6, in_channels=3):
        super().__init__()
        c_in = int(32 * width)
        self.stem = conv_bn(int(in_channels), c_in, 3, stride=2)
        for i, (t, c, n, s) in enumerate(STAGES, start=1):
            c_out, t = int(c * width), t if t == 1 else int(expansion)
            blocks = [InvertedResidual(c_in if b == 0 else c_out, c_out, s if b == 0 else 1, t) for b in range(n)]
            self.add_module(f"stage{i}", nn.Sequential(*blocks))
            c_in = c_out
        last = int(1280 * width) if width > 1.0 else 1280
        self.pool = nn.Sequential(conv_bn(c_in, last, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.classifier = nn.Linear(last, num_classes)
        init_kaiming(self)

    def forward(self, x):
        x = self.stem(x)
        for i in range(1, len(STAGES) + 1):
            x = getattr(self, f"stage{i}")(x)
        return self.classifier(self.pool(x))


def mobilenetv2(num_classes, width=0.5, expansion=6, in_channels=3):
    return MobileNetV2(num_classes, width, expansion, in_channels)
