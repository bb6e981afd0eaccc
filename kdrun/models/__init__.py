from kdrun.models.base import KDModel
from kdrun.models.cnn import SmallCNN
from kdrun.models.lenet import LeNet5
from kdrun.models.mlp import MLP
from kdrun.models.resnet import ResNet

__all__ = ["KDModel", "LeNet5", "MLP", "ResNet", "SmallCNN"]
