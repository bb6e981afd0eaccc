from torch import nn

from kdrun.models.base import Dropout, KDModel


class SmallCNN(KDModel):
    """conv(3x3)-ReLU-maxpool blocks, then one hidden fully connected layer with dropout."""

    def __init__(self, in_shape, num_classes, channels=(32, 64), fc=256, dropout=0.3):
        super().__init__()
        c_in, h, w = in_shape
        blocks = []
        for c in channels:
            blocks += [nn.Conv2d(c_in, int(c), 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
            c_in, h, w = int(c), h // 2, w // 2
        self.body = nn.Sequential(
            *blocks, nn.Flatten(), nn.Linear(c_in * h * w, fc), nn.ReLU(), Dropout(dropout)
        )
        self.head = nn.Linear(fc, num_classes)

    def features(self, x):
        return self.body(x)
