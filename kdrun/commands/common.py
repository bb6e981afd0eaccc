"""What every command shares: device, data, models, recipes, and training one model to a run dir."""

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf, open_dict

from kdrun import distributed
from kdrun.checkpoint import Checkpointer, run_key
from kdrun.data.batches import DeviceData
from kdrun.data.transfer import describe, select_rows
from kdrun.data.memory import hold, normalisation
from kdrun.data.readers import build_reader, reader_config, reader_identity
from kdrun.data.sources import stratified_subset
from kdrun.errors import KdrunError, first_line
from kdrun.io import atomic_write, load_torch_and_hash, write_json
from kdrun.loop import fit
from kdrun.models import capabilities
from kdrun.models.build import RESERVED, build_model, feature_paths, head_path, with_input_shape
from kdrun.models.features import PENULTIMATE, FeatureTap, resolve_stages
from kdrun.run import Recorder, save_model
from kdrun.run_config import run_config

RECIPE_OVERRIDES = {"epochs": "epochs", "batch_size": "batch_size", "lr": "optimizer.lr",  # top-level -> recipe
                    "precision": "precision"}


def resolve_device(name):
    """The torch.device that `device=name` means here; under torchrun, CUDA is this rank's GPU."""
    device = _pick_device(name)
    if distributed.world_size() == 1 or device.type == "cpu":
        return device
    if device.type == "mps":
        raise KdrunError("MPS does not run under torchrun (no process-group backend for it); use device=cpu")
    gpu, count = distributed.local_rank(), torch.cuda.device_count()
    if gpu >= count:
        raise KdrunError(f"torchrun's LOCAL_RANK is {gpu}, but this machine has {count} GPU(s); start at most "
                         f"{count} processes per node with device=cuda")
    return torch.device("cuda", gpu)


def _pick_device(name):
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise KdrunError("device=cuda but CUDA is not available here; use device=cpu or device=auto")
    if name == "mps" and not torch.backends.mps.is_available():
        raise KdrunError("device=mps but MPS is not available here; use device=cpu or device=auto")
    return torch.device(name)


def fold_recipe_overrides(cfg, roles):
    """Copy of cfg where the top-level epochs/batch_size/lr are written into the recipes of `roles`
    (the models this command trains), so a teacher's key records the recipe it was really trained with."""
    cfg = cfg.copy()
    for key, path in RECIPE_OVERRIDES.items():
        value = cfg.get(key)
        if value is None:
            continue
        for role in roles:
            OmegaConf.update(cfg, f"{role}.recipe.{path}", value)
        cfg[key] = None
    return cfg


@dataclass
class Data:
    train: DeviceData  # or StreamData (kdrun.data.memory.hold decides): the same interface
    test: DeviceData
    shape: tuple
    num_classes: int
    transfer: dict  # identity of the transfer set (the train split as the teacher sees it)


_READ = {}  # (reader identity, root, split, fingerprint) -> Split: commands that load twice read once


def _read(reader, ds, root, split):
    key = (json.dumps(reader_identity(ds), sort_keys=True, default=str), str(root), split,
           json.dumps(reader.fingerprint(root, split), sort_keys=True))
    if key not in _READ:
        if len(_READ) >= 4:
            _READ.pop(next(iter(_READ)))
        _READ[key] = reader.read(root, split)
    return _READ[key]


_CHECKED = {}  # the reader check_inputs just used, for the load_data that follows it in the same command


def _locate(cfg, keep=False):
    key = json.dumps([OmegaConf.to_container(reader_config(cfg.dataset), resolve=True), str(cfg.data_dir)],
                     sort_keys=True, default=str)
    if not keep and key in _CHECKED:  # an image tree is listed (one stat per file) once, not twice
        return _CHECKED.pop(key)
    reader = build_reader(cfg.dataset)
    root = reader.locate(cfg.data_dir, cfg.dataset.name, cfg.dataset.get("fallback_hint"))
    if keep:
        _CHECKED.clear()
        _CHECKED[key] = reader, root
    return reader, root


def _check_classes(ds, reader):
    if reader.classes is not None and len(reader.classes) != ds.num_classes:
        raise KdrunError(f"{ds.name} has {len(reader.classes)} classes, but dataset.num_classes is {ds.num_classes}; "
                         f"set dataset.num_classes={len(reader.classes)}")


def load_data(cfg, device):
    ds = cfg.dataset
    reader, root = _locate(cfg)
    transfer = transfer_identity(ds, root, reader)
    splits, normalised = {}, None
    for split, limit in (("train", ds.limit), ("test", ds.test_limit)):
        s = _read(reader, ds, root, split)
        if list(s.images.shape[1:]) != list(ds.shape):
            raise KdrunError(f"{ds.name} {split} images have shape {list(s.images.shape[1:])}, expected {list(ds.shape)}")
        if len(s.labels) and int(s.labels.max()) >= ds.num_classes:
            raise KdrunError(f"{ds.name} {split} labels go up to {int(s.labels.max())}, expected < {ds.num_classes}")
        idx = stratified_subset(s.labels, limit, ds.subset_seed)
        if normalised is None:  # the train split's, for both splits
            normalised = normalisation(ds, s.images, idx)
        splits[split] = hold(ds.name, split, s.images, s.labels, idx, *normalised, device, ds)
    _check_classes(ds, reader)
    if ds.get("classes") is None:  # the files' own names, else the class numbers
        with open_dict(ds):
            ds.classes = list(reader.classes or map(str, range(ds.num_classes)))
    assert transfer["n"] == len(splits["train"])
    return Data(splits["train"], splits["test"], tuple(ds.shape), int(ds.num_classes), transfer)


def target_name(node):
    """The class a config node builds (`kdrun.objectives.HintonKD` -> HintonKD), for results."""
    return node._target_.rsplit(".", 1)[-1]


def check_without_teacher(cfg, objective_key, **build):
    """Preflight of the commands that learn from labels with no teacher (self-distill, mutual): the
    data, the student, the objective config at `objective_key` (built with `build`), and transfer.*,
    which may pick rows but not drop labels or ask for a teacher."""
    check_inputs(cfg)
    for key, value in (("labels", True), ("augment", False), ("bias_correction", False)):
        if cfg.transfer[key] != value:
            raise KdrunError(f"transfer.{key}={str(cfg.transfer[key]).lower()} is for kdrun distill; kdrun {cfg.command} "
                             "trains on labels, with no teacher")
    found = check_buildable(fold_recipe_overrides(cfg, ["student"]), ["student"])
    try:
        objective = instantiate(OmegaConf.select(cfg, objective_key), **build)
    except Exception as e:
        raise KdrunError(f"invalid {objective_key} config: {first_line(e.__cause__ or e)}") from None
    if "penultimate" in (getattr(objective, "student_features", None) or ()):  # the head's input
        found["student"].require(f"kdrun {cfg.command} (its penultimate features, the head's input)")


def labelled_rows(cfg, data):
    """The rows of the train split that transfer.* selects (fraction, classes, less the validation split),
    and what to record about them."""
    rows = select_rows(data.train.labels.cpu(), cfg.transfer, cfg.dataset.subset_seed)
    return data.train.subset(rows.train), {"transfer_set": describe(cfg.transfer), "n_val": int(rows.val.numel())}


def n_params(model):
    return sum(p.numel() for p in model.parameters())


def check_buildable(cfg, roles):
    """Build each role's model (on the meta device: no memory, no compute), run it on a dummy batch of
    the dataset's shape, and build its optimizer and lr schedule, so that a bad value is refused before
    a run starts rather than after. Returns {role: the model's Capabilities}."""
    found = {}
    for role in roles:
        arch = cfg[role].model
        try:
            with torch.device("meta"):
                model = build_model(arch, cfg.dataset.num_classes)
            capabilities.check_forward(model, cfg.dataset.shape, cfg.dataset.num_classes)
            optimizer = instantiate(cfg[role].recipe.optimizer)(model.parameters())
            instantiate(cfg[role].recipe.scheduler)(optimizer, total_steps=1)
            found[role] = capabilities.detect(model, head_path(arch))
        except Exception as e:
            raise KdrunError(f"invalid {role} config: {first_line(e.__cause__ or e)}") from None
    return found


def check_inputs(cfg):
    """What every command checks before a run starts: the device exists, and the dataset is there
    with sound files (IDX: the headers only; CIFAR: read once per process; an image tree: decoded, or found
    in its cache). Returns the identity of the transfer set."""
    resolve_device(cfg.device)
    reader, root = _locate(cfg, keep=True)
    reader.count(root, "test")
    identity = transfer_identity(cfg.dataset, root, reader)
    _check_classes(cfg.dataset, reader)
    return identity


def transfer_identity(ds, raw_dir, reader=None):
    """What the teacher's soft targets are computed over: the train split (which copy of it, by the
    files' hashes, or the decoded pixels' hash), the subset, and the un-jittered transform."""
    reader = reader or build_reader(ds)
    n_train = reader.count(raw_dir, "train")
    identity = {"dataset": ds.name, "split": "train", "files": reader.fingerprint(raw_dir, "train"),
                "limit": ds.limit, "subset_seed": ds.subset_seed, "n": min(n_train, ds.limit or n_train),
                "transform": f"normalize(mean={ds.mean}, std={ds.std}), no jitter"}
    if ds.get("reader") is not None:
        identity["reader"] = reader_identity(ds)
    return identity


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


def attach_objective(arch, model, objective, shape, n_rows=None):
    """Give the objective a FeatureTap on `model` for the student features it declares (stage names of
    the model config `arch`'s `features:` map, or module paths) and let it build its own parameters on
    the model's device (and, if it `uses_rows`, its per-row state for the `n_rows` rows of the train
    split); returns the optimiser param groups of those parameters ([] when none)."""
    names = tuple(getattr(objective, "student_features", ()) or ())
    tap = None
    if names:
        tap = FeatureTap(model, resolve_stages(names, feature_paths(arch)), head_path(arch),
                         penultimate=PENULTIMATE in names, named=list(feature_paths(arch)), role="student")
    device = next(model.parameters()).device
    if hasattr(objective, "attach"):  # an nn.Module that is not an Objective has nothing to attach
        rows = {"n_rows": n_rows} if getattr(objective, "uses_rows", False) else {}
        objective.attach(tap, torch.zeros((2, *shape), device=device), **rows)
    objective.to(device)
    return objective.param_groups() if hasattr(objective, "param_groups") else []


def fit_role(cfg, run_dir, role, model, objective, data, train_set, checkpointer=None):
    """Train `model` (on its device) on `train_set` with `objective` and the `role` recipe, recording
    each epoch in run_dir and checkpointing to `checkpointer` (default: run_dir/checkpoints/last.pt,
    resumed when cfg.resume). Returns (the last epoch's metrics row, seconds)."""
    recipe = cfg[role].recipe
    own = attach_objective(cfg[role].model, model, objective, data.shape, len(data.train))
    params = [{"params": list(model.parameters())}, *own] if own else model.parameters()
    optimizer = instantiate(recipe.optimizer)(params)  # configs are partials
    steps = recipe.epochs * train_set.n_batches(recipe.batch_size)
    scheduler = instantiate(recipe.scheduler)(optimizer, total_steps=steps)
    generator = torch.Generator().manual_seed(cfg.seed)
    recorder = Recorder(run_dir, f"{cfg.command}:{cfg[role].name}")
    if checkpointer is None:
        checkpointer = Checkpointer(Path(run_dir) / "checkpoints" / "last.pt", run_key(cfg),
                                    f"kdrun {cfg.command} of {cfg[role].name}, seed {cfg.seed}", bool(cfg.get("resume")))
    return fit(model, objective, train_set, data.test, optimizer, scheduler, epochs=recipe.epochs,
               batch_size=recipe.batch_size, jitter=recipe.jitter, flip=recipe.get("flip", False), generator=generator,
               recorder=recorder, checkpointer=checkpointer, progress=cfg.progress,
               precision=recipe.get("precision", "fp32"), compile=cfg.get("compile", False),
               channels_last=cfg.get("channels_last", False))


def train_model(cfg, run_dir, role, objective, data, train_set, device, extra_results, init=None, saved_as=None,
                checkpointer=None):
    """Build the `role` model (teacher or student), start it from `init(model)` if given, train it on
    `train_set` with `objective`, save its artifacts (model.pt records `saved_as`, default the role).
    Returns (results, trained model)."""
    torch.manual_seed(cfg.seed)
    model = build_model(cfg[role].model, data.num_classes)
    if init is not None:
        init(model)
    model = model.to(device)
    last, seconds = fit_role(cfg, run_dir, role, model, objective, data, train_set, checkpointer)
    return save_trained(cfg, run_dir, role, model, last, seconds, train_set, extra_results, saved_as,
                        data.num_classes), model


def save_trained(cfg, run_dir, role, model, last, seconds, train_set, extra_results, saved_as=None, num_classes=None):
    """model.pt and results.json of a model trained with the `role` recipe (built with `num_classes`
    outputs, default the dataset's); returns the results."""
    spec = cfg[role]
    recipe = spec.recipe
    arch = OmegaConf.to_container(spec.model, resolve=True)
    model_path = Path(run_dir) / "model.pt"
    save_model(model_path, model, arch, cfg.dataset.name, num_classes or cfg.dataset.num_classes, {"name": spec.name, "role": role, **(saved_as or {})})
    results = {
        "command": cfg.command, "status": "completed", "dataset": cfg.dataset.name,
        "seed": cfg.seed, "epochs": recipe.epochs, "lr": recipe.optimizer.lr, "batch_size": recipe.batch_size,
        "n_train": len(train_set), "n_params": n_params(model),
        "wall_s": round(seconds, 3), "run_dir": str(run_dir), "model": str(model_path),
        "train_accuracy": last.get("train_accuracy"),
        **{k: last[k] for k in ("test_accuracy", "test_errors", "n_test")},
        **extra_results, "config": run_config(cfg),
    }
    write_json(Path(run_dir) / "results.json", results)
    return results


def save_config(cfg, run_dir):
    atomic_write(Path(run_dir) / "config.yaml", lambda f: f.write(OmegaConf.to_yaml(cfg, resolve=True)), mode="w")
