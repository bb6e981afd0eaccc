"""Reading a model back: a kdrun model.pt (checked against the dataset, architecture and number of
outputs it is taken for) or a plain state_dict trained elsewhere (checked key by key and shape by
shape against the architecture it is taken as)."""

import torch
from omegaconf import OmegaConf

from kdrun.errors import KdrunError, first_line
from kdrun.io import load_torch_and_hash
from kdrun.models import capabilities
from kdrun.models.build import RESERVED, build_model, head_path, with_input_shape


def check_model_payload(path, dataset_name, expect_name, expect_arch, role="teacher", num_classes=None,
                        plain_name=None, plain_arch=None):
    """Load a kdrun model.pt, refusing one of another dataset, architecture (expect_arch None: any) or
    number of outputs (a specialist's are its classes and a dustbin); returns (payload, sha256).
    A plain state_dict (a model trained elsewhere) records no architecture and no dataset: it is taken
    for any dataset as the weights of expect_arch (else plain_arch), which it must fit key by key and
    shape by shape; its payload is then made like a model.pt's."""
    payload, sha256 = load_torch_and_hash(path, f"{role} checkpoint")
    if _is_state_dict(payload) and not {"model", "arch", "dataset"} <= set(payload):
        arch = expect_arch if expect_arch is not None else plain_arch
        name = expect_name if expect_arch is not None else plain_name
        return _plain_state_dict(path, payload, name, arch, role, num_classes, dataset_name), sha256
    if not isinstance(payload, dict) or not {"model", "arch", "dataset"} <= set(payload):
        raise KdrunError(f"{path} is not a kdrun model checkpoint")
    if payload["dataset"] != dataset_name:
        raise KdrunError(f"{role} checkpoint {path} was trained on {payload['dataset']}, not {dataset_name}")
    outputs = payload.get("num_classes", num_classes)
    if num_classes is not None and outputs != num_classes:
        raise KdrunError(f"{role} checkpoint {path} has {outputs} outputs ({payload.get('role', 'a model')} of "
                         f"classes {payload.get('classes')}), not the {num_classes} classes of {dataset_name}")
    if expect_arch is not None:
        recorded, expected = _comparable(payload["arch"], expect_arch)
        if recorded != expected:
            name = payload.get("name", "another architecture")
            raise KdrunError(f"{role} checkpoint {path} is {name} {_describe(recorded)}, but {role}={expect_name} "
                             f"is {_describe(expected)}; pass {role}={name}")
    return payload, sha256


def _is_state_dict(payload):
    return isinstance(payload, dict) and bool(payload) and all(torch.is_tensor(v) for v in payload.values())


def _comparable(recorded, expected):
    """The two archs as compared and shown: without kdrun's reserved keys (`features:`, `head:` name
    modules, they change no weight), a recorded kdrun arch from before `in_shape` was in the configs
    given the expected one's, and an in_shape both share left out of what messages show."""
    expected = {k: v for k, v in expected.items() if k not in RESERVED}
    recorded = {k: v for k, v in with_input_shape(recorded, expected.get("in_shape") or []).items()
                if k not in RESERVED}
    if recorded.get("in_shape") == expected.get("in_shape"):
        recorded.pop("in_shape", None)
        expected.pop("in_shape", None)
    return recorded, expected


def _plain_state_dict(path, state, name, arch, role, num_classes, dataset_name):
    if arch is None:
        raise KdrunError(f"{role} checkpoint {path} is a plain state_dict, which records no architecture; pass it as "
                         f"teacher_ckpt={path} with teacher=NAME naming its architecture")
    with torch.device("meta"):
        model = build_model(arch, num_classes)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if not set(state) & set(expected):
        raise KdrunError(f"{path} is not a kdrun model checkpoint")
    try:
        head, _ = capabilities.head_module(model, head_path(arch))
    except KdrunError:
        head = None
    weight = state.get(f"{head}.weight")
    if head is not None and weight is not None and weight.dim() == 2 and weight.shape[0] != num_classes:
        raise KdrunError(f"{role} checkpoint {path} has {weight.shape[0]} outputs ({head}.weight is "
                         f"{list(weight.shape)}), not the {num_classes} classes of {dataset_name}")
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [k for k in expected if k in state and tuple(state[k].shape) != expected[k]]
    if missing or unexpected or mismatched:
        parts = []
        for what, keys in (("missing key", missing), ("unexpected key", unexpected)):
            if keys:
                more = f" (and {len(keys) - 1} more)" if len(keys) > 1 else ""
                parts.append(f"{what} {keys[0]}{more}")
        if mismatched:
            k = mismatched[0]
            parts.append(f"{k} is {list(state[k].shape)} there, {list(expected[k])} in {name}")
        raise KdrunError(f"{role} checkpoint {path} is a state_dict that does not fit {role}={name}: " + "; ".join(parts))
    return {"model": state, "arch": _plain_arch(arch), "dataset": None, "num_classes": num_classes, "name": name,
            "format": "state_dict"}


def _plain_arch(arch):
    return OmegaConf.to_container(arch, resolve=True) if OmegaConf.is_config(arch) else dict(arch)


def load_model(path, data, dataset_name, expect_name, expect_arch, role="teacher", plain_name=None, plain_arch=None):
    """Rebuild a model from a kdrun model.pt or a plain state_dict (see check_model_payload); returns
    (model, sha256)."""
    payload, sha256 = check_model_payload(path, dataset_name, expect_name, expect_arch, role, data.num_classes,
                                          plain_name, plain_arch)
    model = build_model(with_input_shape(payload["arch"], data.shape), data.num_classes)
    try:
        model.load_state_dict(payload["model"])
    except RuntimeError as e:
        raise KdrunError(f"{role} checkpoint {path} does not fit its recorded architecture: {first_line(e)}") from None
    return model.to(data.train.device).eval(), sha256


def _describe(arch):
    return "(" + ", ".join(f"{k}={v}" for k, v in arch.items() if k != "_target_") + ")"
