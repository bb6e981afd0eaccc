"""What kdrun may ask of any nn.Module beyond `model(x) -> logits`, each with a default that works
for a model that offers nothing more: a weight constraint after each step (default: none), a head
(the final nn.Linear: named by the config's `head:`, else `model.head`, else the model's last
nn.Linear) and the penultimate features (the head's input)."""

from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from kdrun.errors import KdrunError, first_line


def constrain(model):
    """The model's own weight constraint after an optimiser step (`model.constrain()`), if it has one."""
    method = getattr(model, "constrain", None)
    if callable(method):
        method()


def _children(model):
    names = [name for name, _ in model.named_children()]
    return ", ".join(names) if names else "none"


def find_module(model, path, key="head"):
    """The submodule at dotted `path` (`fc`, `classifier.3`); a KdrunError line when there is none."""
    try:
        return model.get_submodule(path)
    except AttributeError:
        raise KdrunError(f"{key}: '{path}' is not a module of {type(model).__name__} "
                         f"(its top-level children: {_children(model)})") from None


def head_module(model, head_path=None):
    """(path, nn.Linear) of the model's head: the module at `head_path` if given, else `model.head` if it
    is an nn.Linear, else the last nn.Linear the model registers. A KdrunError line when there is none."""
    if head_path:
        module = find_module(model, head_path)
        if not isinstance(module, nn.Linear):
            raise KdrunError(f"head: '{head_path}' of {type(model).__name__} is a {type(module).__name__}, "
                             "not an nn.Linear")
        return head_path, module
    if isinstance(getattr(model, "head", None), nn.Linear):
        return "head", model.head
    last = None
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            last = (name, module)
    if last is None:
        raise KdrunError(f"{type(model).__name__} has no nn.Linear layer to serve as its head "
                         "(name one with head: in the model config)")
    return last


@dataclass(frozen=True)
class Capabilities:
    """What one model offers, detected once (on the meta device, at preflight)."""

    model: str  # the class name, for messages
    head: str | None  # path of the final nn.Linear; None: the model has none
    head_bias: bool  # the head has a bias (bias correction shifts it)
    head_outputs: int | None
    constrain: bool  # the model has its own constraint (max-norm)
    problem: str | None = None  # why there is no head, as head_module says it

    def require(self, what, bias=False):
        """A KdrunError line when `what` (e.g. 'transfer.bias_correction=true') needs a head (with a
        bias) that this model lacks."""
        if self.head is None:
            raise KdrunError(f"{what} needs the model's final nn.Linear layer (its head), but {self.problem}")
        if bias and not self.head_bias:
            raise KdrunError(f"{what} needs a bias on the model's head, but {self.model}.{self.head} has none "
                             "(bias=False)")


def detect(model, head_path=None):
    """The Capabilities of `model` (any device, the meta device included: nothing is computed)."""
    try:
        path, head = head_module(model, head_path)
    except KdrunError as e:
        if head_path:  # a head the config names but cannot be found is a config error, not a missing capability
            raise
        return Capabilities(type(model).__name__, None, False, None, callable(getattr(model, "constrain", None)),
                            str(e))
    return Capabilities(type(model).__name__, path, head.bias is not None, head.out_features,
                        callable(getattr(model, "constrain", None)))


def check_forward(model, shape, num_classes):
    """A forward pass of a batch of 2 inputs of `shape` on the meta device (shapes only, no compute):
    an input the model cannot take, or logits that are not [2, num_classes], is a ValueError. A model
    whose forward needs real values (.item(), data-dependent shapes) cannot be checked this way and is
    let through."""
    try:
        logits = model(torch.empty(2, *shape, device="meta"))
    except (NotImplementedError, RuntimeError, ValueError) as e:
        if "meta" in str(e).lower():
            return
        raise ValueError(f"{type(model).__name__} does not take inputs of shape {list(shape)}: "
                         f"{_why(model, shape, e)}") from None
    if not torch.is_tensor(logits) or tuple(logits.shape) != (2, int(num_classes)):
        got = list(logits.shape) if torch.is_tensor(logits) else type(logits).__name__
        raise ValueError(f"{type(model).__name__} gives {got} on a batch of 2 inputs of shape {list(shape)}, "
                         f"not logits [2, {num_classes}]")


def _why(model, shape, error):
    first = next((m for m in model.modules() if isinstance(m, nn.modules.conv._ConvNd)), None)
    if first is not None and first.in_channels != shape[0]:
        return f"its first convolution takes {first.in_channels} channels, the data have {shape[0]}"
    return first_line(error)


@contextmanager
def penultimate(model, head_path=None):
    """`with penultimate(model) as feats: logits = model(x)` puts the head's input of that forward
    in feats["penultimate"] (a forward pre-hook on the head, removed on exit)."""
    _, head = head_module(model, head_path)
    feats = {}

    def hook(module, args):
        feats["penultimate"] = args[0]

    handle = head.register_forward_pre_hook(hook)
    try:
        yield feats
    finally:
        handle.remove()


def features_and_logits(model, x, head_path=None):
    """(penultimate features, logits) of one forward of `model` on x."""
    with penultimate(model, head_path) as feats:
        logits = model(x)
    if "penultimate" not in feats:
        raise KdrunError(f"{type(model).__name__}'s forward did not call its head "
                         f"{head_module(model, head_path)[0]}")
    return feats["penultimate"], logits


@torch.no_grad()
def head_bias(model, head_path=None):
    """The head's bias parameter (bias correction shifts some of its entries); a KdrunError line if none."""
    path, head = head_module(model, head_path)
    if head.bias is None:
        raise KdrunError(f"{type(model).__name__}.{path} has no bias to correct (bias=False)")
    return head.bias
