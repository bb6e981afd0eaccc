"""Finding the teacher a command distils from, and its cached soft targets."""

from pathlib import Path

from omegaconf import OmegaConf

from kdrun import soft_targets, store
from kdrun.commands.common import check_model_payload, load_model
from kdrun.errors import KdrunError
from kdrun.io import content_key, sha256_file


def _train_command(cfg, overrides):
    """The `kdrun train` line that makes the teacher a command with these overrides looks for."""
    words = [f"teacher={cfg.teacher.name}", f"dataset={cfg.dataset.name}"]
    for item in overrides:
        key = item.partition("=")[0].lstrip("+~")
        if key.startswith(("teacher.", "dataset.", "data_dir", "workdir")):
            words.append(item)
    words.append(f"seed={cfg.teacher_seed}")
    return "kdrun train " + " ".join(words)


def resolve(cfg, overrides=()):
    """(checkpoint path, key) of the teacher: `teacher_ckpt` if given (its architecture must be
    `teacher=`'s), else the store entry trained with the same teacher config, recipe, dataset and
    `teacher_seed`."""
    if cfg.teacher_ckpt:
        path = Path(cfg.teacher_ckpt)
        if not path.is_file():
            raise KdrunError(f"teacher checkpoint not found: {path}")
        return path, "ckpt-" + sha256_file(path)[:12]
    key = store.teacher_key(cfg, cfg.teacher_seed)
    command = _train_command(cfg, overrides)
    return store.require_teacher(cfg.workdir, key, store.missing_teacher_message(cfg, cfg.teacher_seed, command)), key


def _arch(cfg):
    return OmegaConf.to_container(cfg.teacher.model, resolve=True)


def check(cfg, transfer, overrides=()):
    """Fail before any run starts when the teacher is missing, is not of this dataset and
    architecture, or its soft-target cache is damaged."""
    path, key = resolve(cfg, overrides)
    check_model_payload(path, cfg.dataset.name, cfg.teacher.name, _arch(cfg))
    soft_targets.check_cache(soft_targets.cache_path(cfg.workdir, key, content_key(transfer)))


def load(cfg, data):
    """The teacher model (eval mode, on the data's device) and what to record about it."""
    path, key = resolve(cfg)
    model, sha256 = load_model(path, data, cfg.dataset.name, cfg.teacher.name, _arch(cfg))
    return model, {"teacher": cfg.teacher.name, "teacher_key": key, "teacher_sha256": sha256, "teacher_ckpt": str(path)}


def cached_logits(cfg, data):
    """The teacher's logits over the whole train split, from the cache or computed once and cached."""
    model, info = load(cfg, data)
    manifest = soft_targets.manifest_for(info["teacher_sha256"], data.transfer, data.num_classes)
    cache = soft_targets.cache_path(cfg.workdir, info["teacher_key"], content_key(data.transfer))
    logits = soft_targets.get_or_compute(cache, manifest, model, data.train)
    return logits, {**info, "soft_targets": str(cache)}
