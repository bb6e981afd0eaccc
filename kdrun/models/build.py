"""A model from its config: any `_target_` callable returning an nn.Module (kdrun's own classes,
torchvision.models.resnet18, timm.create_model, a user's class). kdrun passes only `num_classes=`;
whatever else the model needs from the data its config asks for by interpolation
(`in_shape: ${dataset.shape}`)."""

import importlib.util

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import nn

EXTRAS = {"timm": "timm"}  # an optional package -> the kdrun extra that installs it
RESERVED = ("features", "head")  # kdrun's keys in a model config, never passed to `_target_`
# kdrun's models that take `in_shape`, whose configs once left it to kdrun to pass
_TAKE_IN_SHAPE = {f"kdrun.models.{name}" for name in ("MLP", "SmallCNN", "LeNet5", "ResNet")} | {
    "kdrun.models.mlp.MLP", "kdrun.models.cnn.SmallCNN", "kdrun.models.lenet.LeNet5", "kdrun.models.resnet.ResNet"}


def _plain(arch_cfg):
    if isinstance(arch_cfg, DictConfig):
        return OmegaConf.to_container(arch_cfg, resolve=True)
    return dict(arch_cfg)


def build_model(arch_cfg, num_classes):
    """The nn.Module that `arch_cfg` (a config node or the resolved dict a model.pt records) builds
    with `num_classes` outputs."""
    arch = {k: v for k, v in _plain(arch_cfg).items() if k not in RESERVED}
    _check_importable(arch.get("_target_"))
    arch.setdefault("_convert_", "all")  # plain lists and dicts, as torchvision's and timm's builders expect
    model = instantiate(arch, num_classes=int(num_classes))
    if not isinstance(model, nn.Module):
        raise TypeError(f"{arch.get('_target_')} returned a {type(model).__name__}, not a torch.nn.Module")
    return model


def _check_importable(target):
    """A `_target_` whose package is not installed: a message that says so (and which extra has it)."""
    top = str(target or "").split(".", 1)[0]
    if top and importlib.util.find_spec(top) is None:
        extra = EXTRAS.get(top)
        hint = f" (pip install 'kdrun[{extra}]')" if extra else " (is it installed, or its folder on PYTHONPATH?)"
        raise ModuleNotFoundError(f"{target}: no module named {top}{hint}")


def head_path(arch_cfg):
    """The `head:` a model config names (the module path of its final nn.Linear), or None: detected."""
    return _plain(arch_cfg).get("head")


def feature_paths(arch_cfg):
    """The `features:` map (stage name -> module path) a model config names; {} when none."""
    return dict(_plain(arch_cfg).get("features") or {})


def with_input_shape(arch, shape):
    """A recorded arch of one of kdrun's own models from before their configs named `in_shape`: the
    shape the data gives, added (other archs unchanged), so that such a model.pt still rebuilds and
    compares equal to today's config."""
    arch = _plain(arch)
    if arch.get("_target_") in _TAKE_IN_SHAPE and "in_shape" not in arch:
        arch["in_shape"] = list(shape)
    return arch
