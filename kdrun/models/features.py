"""Intermediate outputs of any nn.Module, by forward hooks (not fx: it works for every model, under
DistributedDataParallel and torch.compile, teacher and student alike)."""

from contextlib import contextmanager

from kdrun.errors import KdrunError
from kdrun.models.capabilities import head_module

PENULTIMATE = "penultimate"


def resolve_stages(names, feature_map):
    """{name: module path} for the stage `names` an objective asks for: a name of the model config's
    `features:` map, else taken as a module path itself (FeatureTap checks it). "penultimate" (the
    head's input) needs no path."""
    return {name: feature_map.get(name, name) for name in names if name != PENULTIMATE}


class FeatureTap:
    """`with tap.capture() as feats: logits = model(x)` fills feats[name] with the output of the module
    at stages[name] (a dotted path: `layer1`, `body.3`) and feats["penultimate"] with the head's input,
    for that forward only. The hooks are registered once, here; outside `capture` they do nothing.
    `named` (the config's stage names) and `role` ("student", "teacher") only word the error for a
    stage that is not a module of the model."""

    def __init__(self, model, stages, head_path=None, penultimate=True, named=None, role="model"):
        self.model, self.stages, self._feats = model, dict(stages), None
        self.handles, self.names = [], [*self.stages, *([PENULTIMATE] if penultimate else [])]
        for name, path in self.stages.items():
            try:
                module = model.get_submodule(str(path))
            except AttributeError:
                module = None
            if module is None or module is model:
                where = (f"is neither in the model config's features: map ({', '.join(named)}) nor" if named
                         else "is not")
                children = ", ".join(n for n, _ in model.named_children()) or "none"
                raise KdrunError(f"the {role}'s stage '{name}' {where} a module of {type(model).__name__} "
                                 f"(its top-level children: {children})")
            self.handles.append(module.register_forward_hook(self._keeper(name)))
        if penultimate:
            _, head = head_module(model, head_path)
            self.handles.append(head.register_forward_pre_hook(self._pre_keeper(PENULTIMATE)))

    def _keeper(self, name):
        def hook(module, args, output):
            if self._feats is not None:
                self._feats[name] = output
        return hook

    def _pre_keeper(self, name):
        def hook(module, args):
            if self._feats is not None:
                self._feats[name] = args[0]
        return hook

    @contextmanager
    def capture(self):
        feats = self._feats = {}
        try:
            yield feats
        finally:
            self._feats = None
        missing = [n for n in self.names if n not in feats]
        if missing:
            raise KdrunError(f"{type(self.model).__name__}'s forward did not run the module(s) of "
                             f"{', '.join(missing)}")

    def remove(self):
        for handle in self.handles:
            handle.remove()
        self.handles = []
