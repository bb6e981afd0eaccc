from kdrun.models.base import KDModel
from kdrun.models.cnn import SmallCNN
from kdrun.models.mlp import MLP

__all__ = ["KDModel", "MLP", "SmallCNN"]
