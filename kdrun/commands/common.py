"""What every command shares: device, data, models, recipes, and training one model to a run dir."""

import functools
from dataclasses import dataclass
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from kdrun import distributed
from kdrun.checkpoint import Checkpointer, run_key
from kdrun.data.batches import DeviceData
from kdrun.data.transfer import describe, select_rows
from kdrun.data.sources import check_split_files, load_split, locate, split_fingerprint, stratified_subset
from kdrun.errors import KdrunError, first_line
from kdrun.io import atomic_write, load_torch_and_hash, write_json
from kdrun.loop import fit
from kdrun.run import Recorder, save_model

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
    train: DeviceData
    test: DeviceData
    shape: tuple
    num_classes: int
    transfer: dict  # identity of the transfer set (the train split as the teacher sees it)


@functools.lru_cache(maxsize=4)
def _read(raw_dir, split, fmt):
    return load_split(raw_dir, split, fmt)


def load_data(cfg, device):
    ds = cfg.dataset
    raw = locate(ds, cfg.data_dir)
    transfer = transfer_identity(ds, raw)
    splits = {}
    for split, limit in (("train", ds.limit), ("test", ds.test_limit)):
        s = _read(str(raw), split, ds.get("format", "idx"))
        if list(s.images.shape[1:]) != list(ds.shape):
            raise KdrunError(f"{ds.name} {split} images have shape {list(s.images.shape[1:])}, expected {list(ds.shape)}")
        if int(s.labels.max()) >= ds.num_classes:
            raise KdrunError(f"{ds.name} {split} labels go up to {int(s.labels.max())}, expected < {ds.num_classes}")
        idx = stratified_subset(s.labels, limit, ds.subset_seed)
        splits[split] = DeviceData(s.images[idx], s.labels[idx], ds.mean, ds.std, device)
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
    check_buildable(fold_recipe_overrides(cfg, ["student"]), ["student"])
    try:
        instantiate(OmegaConf.select(cfg, objective_key), **build)
    except Exception as e:
        raise KdrunError(f"invalid {objective_key} config: {first_line(e.__cause__ or e)}") from None


def labelled_rows(cfg, data):
    """The rows of the train split that transfer.* selects (fraction, classes, less the validation split),
    and what to record about them."""
    rows = select_rows(data.train.labels.cpu(), cfg.transfer, cfg.dataset.subset_seed)
    return data.train.subset(rows.train), {"transfer_set": describe(cfg.transfer), "n_val": int(rows.val.numel())}


def build_model(arch, shape, num_classes):
    return instantiate(arch, in_shape=list(shape), num_classes=int(num_classes))


def n_params(model):
    return sum(p.numel() for p in model.parameters())


def check_buildable(cfg, roles):
    """Build each role's model (on the meta device: no memory, no compute), optimizer and lr schedule,
    so that a bad value is refused before a run starts rather than after."""
    for role in roles:
        try:
            with torch.device("meta"):
                model = build_model(cfg[role].model, cfg.dataset.shape, cfg.dataset.num_classes)
            optimizer = instantiate(cfg[role].recipe.optimizer)(model.parameters())
            instantiate(cfg[role].recipe.scheduler)(optimizer, total_steps=1)
        except Exception as e:
            raise KdrunError(f"invalid {role} config: {first_line(e.__cause__ or e)}") from None


def check_inputs(cfg):
    """What every command checks before a run starts: the device exists, and the dataset is there
    with sound files (IDX: the headers only; CIFAR-10: read once per process). Returns the identity of the
    transfer set."""
    resolve_device(cfg.device)
    raw = locate(cfg.dataset, cfg.data_dir)
    check_split_files(raw, "test", cfg.dataset.get("format", "idx"))
    return transfer_identity(cfg.dataset, raw)


def transfer_identity(ds, raw_dir):
    """What the teacher's soft targets are computed over: the train split (which copy of it, by the
    files' hashes), the subset, and the un-jittered transform."""
    fmt = ds.get("format", "idx")
    n_train = check_split_files(raw_dir, "train", fmt)
    return {"dataset": ds.name, "split": "train", "files": split_fingerprint(raw_dir, "train", fmt), "limit": ds.limit,
            "subset_seed": ds.subset_seed, "n": min(n_train, ds.limit or n_train),
            "transform": f"normalize(mean={ds.mean}, std={ds.std}), no jitter"}


def check_model_payload(path, dataset_name, expect_name, expect_arch, role="teacher", num_classes=None):
    """Load a kdrun model.pt, refusing one of another dataset, architecture (expect_arch None: any) or
    number of outputs (a specialist's are its classes and a dustbin); returns (payload, sha256)."""
    payload, sha256 = load_torch_and_hash(path, f"{role} checkpoint")
    if not isinstance(payload, dict) or not {"model", "arch", "dataset"} <= set(payload):
        raise KdrunError(f"{path} is not a kdrun model checkpoint")
    if payload["dataset"] != dataset_name:
        raise KdrunError(f"{role} checkpoint {path} was trained on {payload['dataset']}, not {dataset_name}")
    outputs = payload.get("num_classes", num_classes)
    if num_classes is not None and outputs != num_classes:
        raise KdrunError(f"{role} checkpoint {path} has {outputs} outputs ({payload.get('role', 'a model')} of "
                         f"classes {payload.get('classes')}), not the {num_classes} classes of {dataset_name}")
    if expect_arch is not None and payload["arch"] != expect_arch:
        name = payload.get("name", "another architecture")
        raise KdrunError(f"{role} checkpoint {path} is {name} {_describe(payload['arch'])}, but {role}={expect_name} "
                         f"is {_describe(expect_arch)}; pass {role}={name}")
    return payload, sha256


def load_model(path, data, dataset_name, expect_name, expect_arch, role="teacher"):
    """Rebuild a model from a kdrun model.pt (see check_model_payload); returns (model, sha256)."""
    payload, sha256 = check_model_payload(path, dataset_name, expect_name, expect_arch, role, data.num_classes)
    model = build_model(payload["arch"], data.shape, data.num_classes)
    try:
        model.load_state_dict(payload["model"])
    except RuntimeError as e:
        raise KdrunError(f"{role} checkpoint {path} does not fit its recorded architecture: {first_line(e)}") from None
    return model.to(data.train.device).eval(), sha256


def _describe(arch):
    return "(" + ", ".join(f"{k}={v}" for k, v in arch.items() if k != "_target_") + ")"


def fit_role(cfg, run_dir, role, model, objective, data, train_set, checkpointer=None):
    """Train `model` (on its device) on `train_set` with `objective` and the `role` recipe, recording
    each epoch in run_dir and checkpointing to `checkpointer` (default: run_dir/checkpoints/last.pt,
    resumed when cfg.resume). Returns (the last epoch's metrics row, seconds)."""
    recipe = cfg[role].recipe
    optimizer = instantiate(recipe.optimizer)(model.parameters())  # configs are partials
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
               precision=recipe.get("precision", "fp32"), compile=cfg.get("compile", False))


def train_model(cfg, run_dir, role, objective, data, train_set, device, extra_results, init=None, saved_as=None,
                checkpointer=None):
    """Build the `role` model (teacher or student), start it from `init(model)` if given, train it on
    `train_set` with `objective`, save its artifacts (model.pt records `saved_as`, default the role).
    Returns (results, trained model)."""
    torch.manual_seed(cfg.seed)
    model = build_model(cfg[role].model, data.shape, data.num_classes)
    if init is not None:
        init(model)
    model = model.to(device)
    last, seconds = fit_role(cfg, run_dir, role, model, objective, data, train_set, checkpointer)
    return save_trained(cfg, run_dir, role, model, last, seconds, train_set, extra_results, saved_as), model


def save_trained(cfg, run_dir, role, model, last, seconds, train_set, extra_results, saved_as=None):
    """model.pt and results.json of a model trained with the `role` recipe; returns the results."""
    spec = cfg[role]
    recipe = spec.recipe
    arch = OmegaConf.to_container(spec.model, resolve=True)
    model_path = Path(run_dir) / "model.pt"
    save_model(model_path, model, arch, cfg.dataset.name, {"name": spec.name, "role": role, **(saved_as or {})})
    results = {
        "command": cfg.command, "status": "completed", "dataset": cfg.dataset.name,
        "seed": cfg.seed, "epochs": recipe.epochs, "lr": recipe.optimizer.lr, "batch_size": recipe.batch_size,
        "n_train": len(train_set), "n_params": n_params(model),
        "wall_s": round(seconds, 3), "run_dir": str(run_dir), "model": str(model_path),
        "train_accuracy": last.get("train_accuracy"),
        **{k: last[k] for k in ("test_accuracy", "test_errors", "n_test")},
        **extra_results,
    }
    write_json(Path(run_dir) / "results.json", results)
    return results


def save_config(cfg, run_dir):
    atomic_write(Path(run_dir) / "config.yaml", lambda f: f.write(OmegaConf.to_yaml(cfg, resolve=True)), mode="w")
