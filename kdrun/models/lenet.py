from torch import nn

from kdrun.models.base import Dropout, KDModel


class LeNet5(KDModel):
    """LeNet-5 with ReLU and max-pooling: conv(5x5, padding 2)-pool, conv(5x5)-pool, then fully connected
    layers. The first conv's padding keeps a 28x28 image at 28x28, as the original's 32x32 input did."""

    def __init__(self, in_shape, num_classes, channels=(6, 16), fc=(120, 84), dropout=0.0):
        super().__init__()
        c_in, h, w = in_shape
        if len(channels) != 2:
            raise ValueError(f"channels must give the widths of LeNet5's 2 conv layers, got {list(channels)}")
        c1, c2 = (int(c) for c in channels)
        h, w = (h // 2 - 4) // 2, (w // 2 - 4) // 2  # sizes after conv-pool-conv-pool
        if h < 1 or w < 1:
            raise ValueError(f"input {list(in_shape)} is too small for LeNet5's two conv(5x5)-pool stages")
        layers = [
            nn.Conv2d(c_in, c1, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, 5), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(),
        ]
        width = c2 * h * w
        for units in fc:
            layers += [nn.Linear(width, int(units)), nn.ReLU(), Dropout(dropout)]
            width = int(units)
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(width, num_classes)

    def features(self, x):
        return self.body(x)
