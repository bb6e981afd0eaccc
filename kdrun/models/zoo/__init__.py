"""The CIFAR model zoo of the distillation literature (the architectures of RepDistiller's benchmark,
reused by most papers since), written for kdrun: each takes `num_classes` (and `in_channels`, 3 by
default), names its stages for the feature methods, and has the published parameter count."""

from kdrun.models.zoo.mobilenetv2 import MobileNetV2, mobilenetv2
from kdrun.models.zoo.resnet import CifarResNet, resnet
from kdrun.models.zoo.shufflenet import ShuffleNetV1, ShuffleNetV2, shufflenetv1, shufflenetv2
from kdrun.models.zoo.vgg import VGG, vgg
from kdrun.models.zoo.wrn import WideResNet, wrn

# name -> (builder, keyword arguments): what conf/model/<name>.yaml builds
ZOO = {
    **{f"resnet{d}": (resnet, {"depth": d}) for d in (8, 14, 20, 32, 44, 56, 110)},
    "resnet8x4": (resnet, {"depth": 8, "widths": [32, 64, 128, 256]}),
    "resnet32x4": (resnet, {"depth": 32, "widths": [32, 64, 128, 256]}),
    **{f"wrn_{d}_{k}": (wrn, {"depth": d, "widen": k}) for d, k in ((16, 1), (16, 2), (40, 1), (40, 2))},
    **{f"vgg{d}": (vgg, {"depth": d}) for d in (8, 11, 13, 16, 19)},
    "mobilenetv2": (mobilenetv2, {}),
    "shufflenetv1": (shufflenetv1, {}),
    "shufflenetv2": (shufflenetv2, {}),
}

__all__ = ["ZOO", "CifarResNet", "MobileNetV2", "ShuffleNetV1", "ShuffleNetV2", "VGG", "WideResNet", "mobilenetv2",
           "resnet", "shufflenetv1", "shufflenetv2", "vgg", "wrn"]
