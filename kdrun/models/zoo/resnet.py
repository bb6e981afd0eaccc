"""CIFAR ResNets (He et al. 2016, section 4.2) as the distillation benchmark uses them: a 3x3 stem,
three stages of basic blocks (stride 2 at the start of stages 2 and 3), 1x1 conv-BN projections where
the shape changes, global average pooling. depth = 6n + 2; `widths` = [stem, stage 1, stage 2, stage 3]
([16, 16, 32, 64] for resnet8..110, [32, 64, 128, 256] for the x4 variants)."""

from torch import nn

from kdrun.models.zoo.layers import conv_bn, init_kaiming


class BasicBlock(nn.Module):
    def __init__(self, c_in, c_out, stride):
        super().__init__()
        self.conv1 = conv_bn(c_in, c_out, 3, stride)
        self.conv2 = conv_bn(c_out, c_out, 3, relu=False)
        self.shortcut = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = conv_bn(c_in, c_out, 1, stride, relu=False)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        return self.relu(self.conv2(self.conv1(x)) + self.shortcut(x))


class CifarResNet(nn.Module):
    """Stages `layer1`..`layer3`, pooled features `pool`, head `fc`."""

    def __init__(self, num_classes, depth=20, widths=(16, 16, 32, 64), in_channels=3):
        super().__init__()
        if int(depth) != depth or depth < 8 or (depth - 2) % 6:
            raise ValueError(f"depth must be 6n+2 (8, 14, 20, 32, ...), got {depth}")
        if len(widths) != 4:
            raise ValueError(f"widths must give the stem's and the 3 stages' channels, got {list(widths)}")
        n = (int(depth) - 2) // 6
        stem, *stages = (int(w) for w in widths)
        self.stem = conv_bn(int(in_channels), stem, 3)
        c_in, layers = stem, []
        for i, width in enumerate(stages):
            blocks = [BasicBlock(c_in if b == 0 else width, width, 2 if i > 0 and b == 0 else 1) for b in range(n)]
            layers.append(nn.Sequential(*blocks))
            c_in = width
        self.layer1, self.layer2, self.layer3 = layers
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(c_in, num_classes)
        init_kaiming(self)

    def forward(self, x):
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))
        return self.fc(self.pool(x))


def resnet(num_classes, depth=20, widths=(16, 16, 32, 64), in_channels=3):
    return CifarResNet(num_classes, depth, widths, in_channels)
