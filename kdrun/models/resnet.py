from torch import nn

from kdrun.models.base import KDModel


def _conv3x3(c_in, c_out, stride=1):
    return nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)  # BatchNorm follows: no bias


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers plus a shortcut: identity, or a 1x1 conv-BN projection where the shape changes."""

    def __init__(self, c_in, c_out, stride):
        super().__init__()
        self.conv1, self.bn1 = _conv3x3(c_in, c_out, stride), nn.BatchNorm2d(c_out)
        self.conv2, self.bn2 = _conv3x3(c_out, c_out), nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU()
        self.shortcut = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet(KDModel):
    """The CIFAR ResNet of He et al. 2016 (section 4.2): a 3x3 conv, three stages of n basic blocks
    (stride 2 at the start of stages 2 and 3), global average pooling; depth = 6n + 2."""

    def __init__(self, in_shape, num_classes, depth=20, widths=(16, 32, 64)):
        super().__init__()
        if int(depth) != depth or depth < 8 or (depth - 2) % 6:
            raise ValueError(f"depth must be 6n+2 (8, 14, 20, 32, ...), got {depth}")
        if len(widths) != 3:  # depth = 6n + 2 counts three stages
            raise ValueError(f"widths must give the channels of the 3 stages, got {list(widths)}")
        n = (int(depth) - 2) // 6
        widths = [int(w) for w in widths]
        layers = [_conv3x3(in_shape[0], widths[0]), nn.BatchNorm2d(widths[0]), nn.ReLU()]
        c_in = widths[0]
        for stage, width in enumerate(widths):
            for block in range(n):
                layers.append(BasicBlock(c_in, width, stride=2 if stage > 0 and block == 0 else 1))
                c_in = width
        self.body = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(c_in, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def features(self, x):
        return self.body(x)
