"""The teacher store: trained teachers under workdir/teachers/<key>/, found by a content key of
what made them (teacher config, effective recipe, the dataset by its files' hashes, seed)."""

import json
import logging
import shutil
from pathlib import Path

from filelock import FileLock
from omegaconf import OmegaConf

from kdrun.checkpoint import Checkpointer
from kdrun.data.loading import identify
from kdrun.data.readers import reader_identity
from kdrun.errors import KdrunError
from kdrun.io import atomic_write, content_key, read_json, sha256_file, write_json
from kdrun.models.build import RESERVED
from kdrun.run_config import flatten

log = logging.getLogger("kdrun")


def dataset_identity(ds, data):
    """The dataset a teacher learns from: its train split by content (`data`: the transfer identity,
    kdrun.data.loading.transfer_identity; its files' hashes, or its decoded pixels' hash), its name and
    subset, the normalisation of its inputs, and what of its reader's options changes the data (CIFAR-100's
    coarse labels, an image folder's size and channels). A changed data file is another dataset, so
    another key."""
    identity = {"name": ds.name, "limit": ds.limit, "subset_seed": ds.subset_seed, "files": data["files"],
                **{k: OmegaConf.to_container(v) if OmegaConf.is_config(v) else v
                   for k, v in (("mean", ds.get("mean")), ("std", ds.get("std")))}}
    if ds.get("reader") is not None:
        identity["reader"] = reader_identity(ds)
    return identity


def identity_of(spec, dataset, seed, data):
    """Everything that determines a trained teacher: its config `spec` (with the effective recipe), the
    dataset (see dataset_identity) and the seed. The model config's `features:` and `head:` only name
    its parts, so they are left out: naming another stage finds the same stored teacher."""
    teacher = OmegaConf.to_container(spec, resolve=True)
    if isinstance(teacher.get("model"), dict):
        teacher["model"] = {k: v for k, v in teacher["model"].items() if k not in RESERVED}
    return {
        "teacher": teacher,
        "dataset": dataset_identity(dataset, data),
        "seed": int(seed),
    }


def teacher_identity(cfg, seed, data=None):
    """identity_of() of a command config's teacher (`cfg.teacher.recipe` must be the effective recipe);
    `data`, the transfer identity, is found from cfg.dataset and cfg.data_dir when not given."""
    if data is None:
        data = identify(cfg)
    return identity_of(cfg.teacher, cfg.dataset, seed, data)


def teacher_key(cfg, seed, data=None):
    return content_key(teacher_identity(cfg, seed, data))


def _entry(workdir, key):
    return Path(workdir) / "teachers" / key


def lookup(workdir, key):
    """The stored teacher's model.pt, or None. teacher.json is written last: it marks a complete entry."""
    entry = _entry(workdir, key)
    return entry / "model.pt" if (entry / "teacher.json").is_file() and (entry / "model.pt").is_file() else None


def publish(workdir, key, model_path, identity, run_dir, results):
    entry = _entry(workdir, key)
    entry.mkdir(parents=True, exist_ok=True)
    with FileLock(str(entry) + ".lock"), open(model_path, "rb") as src:
        (entry / "teacher.json").unlink(missing_ok=True)
        atomic_write(entry / "model.pt", lambda f: shutil.copyfileobj(src, f))
        write_json(entry / "teacher.json", {"key": key, "identity": identity, "run_dir": str(run_dir),
                                            "sha256": sha256_file(entry / "model.pt"), "results": results})
    return entry / "model.pt"


def train_or_reuse(workdir, key, identity, train, retrain=False):
    """(stored model.pt, results of training it or None if reused): `train(checkpointer)` runs only when
    the store lacks `key` (or `retrain`), under a lock, so concurrent jobs wanting one model train it once.
    Its checkpoint lives in the entry, so a training of `key` left unfinished resumes, whichever run
    asks for it next (retrain=true starts afresh)."""
    entry = _entry(workdir, key)
    entry.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(entry) + ".train.lock"):
        existing = lookup(workdir, key)
        if existing is not None and not retrain:
            return existing, None
        checkpointer = Checkpointer(entry / "training" / "last.pt", key, f"the store's teacher {key}", not retrain)
        if checkpointer.resume and checkpointer.path.is_file():
            log.info("teacher %s: resuming its unfinished training from %s", key, checkpointer.path)
        results = train(checkpointer)
        path = publish(workdir, key, Path(results["model"]), identity, results["run_dir"], results)
        checkpointer.discard()
        return path, results


def record_path(workdir, key):
    return _entry(workdir, key) / "teacher.json"


def write_record(workdir, key, identity, results):
    """teacher.json alone, for a teacher with no model.pt of its own (an ensemble): reports find its row
    as they find a trained teacher's; `lookup` never takes it for a model."""
    entry = _entry(workdir, key)
    entry.mkdir(parents=True, exist_ok=True)
    with FileLock(str(entry) + ".lock"):
        write_json(record_path(workdir, key), {"key": key, "identity": identity, "results": results})
    return record_path(workdir, key)


def stored_results(workdir, key):
    return read_json(_entry(workdir, key) / "teacher.json").get("results", {})


def missing_teacher_message(wanted, workdir, command, suggest_seed=True):
    """Say which command trains the teacher of identity `wanted`, and which stored teacher of the same
    name and dataset differs least (as the overrides that would select it; one of another seed only if
    `suggest_seed`). One trained on other data files is no override away, so it is not suggested."""
    want = flatten(wanted)
    near, unhashed = [], []
    for meta in sorted((Path(workdir) / "teachers").glob("*/teacher.json")):
        stored = read_json(meta).get("identity", {})
        if set(stored) != {"teacher", "dataset", "seed"}:  # a generalist, a specialist, an ensemble
            continue
        have = flatten(stored)
        if have.get("teacher.name") == want["teacher.name"] and have.get("dataset.name") == want["dataset.name"]:
            diff = sorted(k for k in set(want) | set(have) if want.get(k) != have.get(k))
            if "seed" in diff and not suggest_seed:
                continue
            files = [k for k in diff if k == "dataset.files" or k.startswith("dataset.files.")]
            if files:
                if len(files) == len(diff) and not any(k.startswith("dataset.files") for k in have):
                    unhashed.append(meta.parent.name)
                continue
            near.append((len(diff), " ".join(_override(k, have[k]) if k in have else f"~{k}" for k in diff)))
    msg = (f"no trained teacher {want['teacher.name']} for {want['dataset.name']} with seed {wanted['seed']} and "
           f"this recipe (key {content_key(wanted)}); train it with: {command}")
    if near:
        msg += f"; or use the stored one trained with {min(near)[1]} by adding that to your command"
    elif unhashed:
        msg += (f"; the stored teacher {unhashed[0]} has this config but records no hashes of its data files, "
                "so it is not reused")
    return msg


def _override(key, value):
    """A command-line override for an identity key: `seed` is the teacher's, the rest are config keys."""
    key = "teacher_seed" if key == "seed" else key
    return f"{key}={json.dumps(value, separators=(',', ':'))}"


def require_teacher(workdir, key, message):
    path = lookup(workdir, key)
    if path is None:
        raise KdrunError(message)
    return path
