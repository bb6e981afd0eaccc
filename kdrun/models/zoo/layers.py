"""Small building blocks the zoo's networks share."""

from torch import nn


def conv_bn(c_in, c_out, kernel, stride=1, groups=1, relu=True):
    """A bias-free convolution (BatchNorm follows), its BatchNorm and, optionally, a ReLU."""
    layers = [nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=kernel // 2, groups=groups, bias=False),
              nn.BatchNorm2d(c_out)]
    if relu:
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class ChannelShuffle(nn.Module):
    """ShuffleNet's channel shuffle: [N, g*c, H, W] -> interleave the g groups' channels."""

    def __init__(self, groups):
        super().__init__()
        self.groups = groups

    def forward(self, x):
        n, c, h, w = x.shape
        return x.view(n, self.groups, c // self.groups, h, w).transpose(1, 2).reshape(n, c, h, w)


def init_kaiming(model):
    """He initialisation of every convolution (fan-out, ReLU gain); BatchNorm at weight 1, bias 0."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
