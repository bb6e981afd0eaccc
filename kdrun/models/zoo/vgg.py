"""VGG with batch norm for CIFAR (Simonyan & Zisserman 2015, without the large fully connected layers):
five blocks of 3x3 conv-BN-ReLU, max-pooling after the first three (and after the fourth only for
inputs of 64 pixels or more, as the benchmark's code does: a 32x32 image reaches blocks 4 and 5 at
4x4), global average pooling and one linear layer. vgg8 has one conv per block."""

from torch import nn

from kdrun.models.zoo.layers import init_kaiming

BLOCKS = {  # depth -> convs per block (the widths are 64, 128, 256, 512, 512)
    8: (1, 1, 1, 1, 1),
    11: (1, 1, 2, 2, 2),
    13: (2, 2, 2, 2, 2),
    16: (2, 2, 3, 3, 3),
    19: (2, 2, 4, 4, 4),
}
WIDTHS = (64, 128, 256, 512, 512)


def _block(c_in, c_out, n):
    layers = []
    for i in range(n):
        layers += [nn.Conv2d(c_in if i == 0 else c_out, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU()]
    return nn.Sequential(*layers)


class VGG(nn.Module):
    """Stages `block0`..`block4`, pooled features `pool`, head `classifier`."""

    def __init__(self, num_classes, depth=13, in_channels=3):
        super().__init__()
        if depth not in BLOCKS:
            raise ValueError(f"depth must be one of {', '.join(map(str, BLOCKS))}, got {depth}")
        c_in, blocks = int(in_channels), []
        for width, n in zip(WIDTHS, BLOCKS[depth]):
            blocks.append(_block(c_in, width, n))
            c_in = width
        self.block0, self.block1, self.block2, self.block3, self.block4 = blocks
        self.down = nn.MaxPool2d(2)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.classifier = nn.Linear(c_in, num_classes)
        init_kaiming(self)

    def forward(self, x):
        large = x.shape[-2] >= 64
        x = self.down(self.block0(x))
        x = self.down(self.block1(x))
        x = self.down(self.block2(x))
        x = self.block3(x)
        if large:
            x = self.down(x)
        return self.classifier(self.pool(self.block4(x)))


def vgg(num_classes, depth=13, in_channels=3):
    return VGG(num_classes, depth, in_channels)
