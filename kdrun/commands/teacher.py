"""Finding the teacher a command distils from (one stored model, or an ensemble of them: `teacher=ensemble`),
and its cached soft targets."""

import shlex
from dataclasses import dataclass, replace
from pathlib import Path

from omegaconf import OmegaConf

from kdrun import distributed, soft_targets, store
from kdrun.ensemble import Ensemble
from kdrun.errors import KdrunError
from kdrun.io import content_key, sha256_file
from kdrun.loop import evaluate
from kdrun.model_files import check_model_payload, load_model
from kdrun.parts import RECIPE_OVERRIDES, TeacherSource, teacher_seed
from kdrun.training import n_params
from kdrun.validate import integer, model_spec


def _train_command(cfg, overrides, seed=True):
    """The `kdrun train` line that makes the teacher a command with these overrides looks for
    (for an ensemble: trains its missing members)."""
    words = [f"teacher={cfg.teacher.name}", f"dataset={cfg.dataset.name}"]
    for item in overrides:
        key = item.partition("=")[0].lstrip("+~")
        if key.startswith(("teacher.", "dataset.", "data_dir", "workdir", "experiment")):
            words.append(item)
    if seed:
        words.append(f"seed={teacher_seed(cfg)}")
    return "kdrun train " + " ".join(shlex.quote(w) for w in words)


def is_ensemble(cfg):
    return "members" in cfg.teacher


def source(cfg, data, overrides=()):
    """The teacher a command with this config uses (a TeacherSource): `data` is the transfer set's
    identity, which the store's key holds; an ensemble's members are resolved here, once."""
    found = TeacherSource.of(cfg, data)
    if found.is_ensemble:
        return replace(found, members=tuple(members(cfg, found, overrides)))
    return replace(found, train_command=_train_command(cfg, overrides))


# ---------------------------------------------------------------- one teacher


def resolve(teacher):
    """(checkpoint path, key) of the teacher (a TeacherSource): `teacher_ckpt` if given, else the store
    entry trained with the same teacher config, recipe, dataset and `teacher_seed`."""
    if teacher.ckpt:
        return _checkpoint(teacher.ckpt)
    key = teacher.key
    message = store.missing_teacher_message(teacher.identity(), teacher.workdir, teacher.train_command)
    return store.require_teacher(teacher.workdir, key, message), key


def _checkpoint(path):
    path = Path(path)
    if not path.is_file():
        raise KdrunError(f"teacher checkpoint not found: {path}")
    return path, "ckpt-" + sha256_file(path)[:12]


# ---------------------------------------------------------------- ensembles

# teacher=ensemble's recipe keys, each set in every member's recipe when not null
ENSEMBLE_RECIPE = (*RECIPE_OVERRIDES.values(), "val_size")


@dataclass
class Member:
    """One member of `teacher.members`: a stored teacher (cfg: the command's config with this member
    as its teacher, which `kdrun train` trains it with; source: where the store has it) or a model.pt
    (ckpt)."""

    where: str
    cfg: object = None
    source: TeacherSource = None
    ckpt: str = None
    train_command: str = None  # `kdrun train teacher=ensemble ...`, which trains the missing members

    @property
    def seed(self):
        return None if self.source is None else self.source.seed

    @property
    def key(self):
        return _checkpoint(self.ckpt)[1] if self.ckpt else self.source.key

    def path(self):
        if self.ckpt:
            return _checkpoint(self.ckpt)[0]
        message = store.missing_teacher_message(self.source.identity(), self.source.workdir, self.train_command,
                                                suggest_seed=False)
        return store.require_teacher(self.source.workdir, self.key, f"{self.where}: {message}")

    def check(self, dataset):
        if self.ckpt:
            return check_model_payload(self.path(), dataset.name, None, None, num_classes=dataset.num_classes)
        return check_model_payload(self.path(), dataset.name, self.source.name, self.source.arch,
                                   num_classes=dataset.num_classes)


def members(cfg, ensemble, overrides=()):
    """The members of `teacher=ensemble` (`ensemble`: its TeacherSource): each entry of teacher.members
    is a seed of teacher.member, a string of `kdrun train` overrides naming a stored teacher
    ('teacher=cnn seed=2'), or a model.pt."""
    from hydra import compose

    from kdrun.launch import explain

    spec = cfg.teacher
    command = _train_command(cfg, overrides, seed=False)
    out = []
    for i, entry in enumerate(spec.members):
        where = f"teacher.members[{i}]"
        if isinstance(entry, str) and entry.endswith(".pt"):
            out.append(Member(where, ckpt=entry))
            continue
        if isinstance(entry, int) and not isinstance(entry, bool):
            words = [f"seed={entry}"]
        elif isinstance(entry, str):
            words = shlex.split(entry)
        else:
            raise KdrunError(f"{where} must be a seed, a string of overrides like 'teacher=cnn seed=2', "
                             f"or a model.pt path, got {entry!r}")
        for word in words:
            key = word.partition("=")[0]
            if key not in ("teacher", "seed") and not key.startswith("teacher."):
                raise KdrunError(f"{where}: '{word}' does not name a stored teacher; use teacher=NAME, "
                                 "teacher.KEY=VALUE and seed=N")
        try:
            composed = compose(config_name="train", overrides=[f"teacher={spec.member}", *words])
        except Exception as e:
            raise KdrunError(f"{where}: {explain(e, 'train')}") from None
        if "members" in composed.teacher:
            raise KdrunError(f"{where}: a member cannot itself be an ensemble")
        integer(f"{where}: seed", composed.seed, 0)
        member_cfg = cfg.copy()
        OmegaConf.set_struct(member_cfg, False)
        member_cfg.teacher = composed.teacher
        for path in ENSEMBLE_RECIPE:  # the ensemble's teacher.recipe.* wins over a member's own
            value = OmegaConf.select(spec.recipe, path, default=None)
            if value is not None:
                OmegaConf.update(member_cfg, f"teacher.recipe.{path}", value)
        model_spec(where, member_cfg.teacher)
        out.append(Member(where, cfg=member_cfg, source=ensemble.with_spec(member_cfg.teacher, composed.seed),
                          train_command=command))
    return out


def ensemble_keys(ensemble, keys):
    """(key of the ensemble as a teacher, key of its soft-target cache): the cache holds every member's
    logits, so arithmetic and geometric share it."""
    return content_key({"members": keys, "combine": ensemble.spec.combine}), content_key({"members": keys})


def ensemble_name(ensemble, group):
    names = [m.source.name if m.source is not None else Path(m.ckpt).name for m in group]
    parts = [f"{names.count(n)}x {n}" for n in dict.fromkeys(names)]
    return f"ensemble({ensemble.spec.combine}, {' + '.join(parts)})"


def ensemble_record(ensemble, model, group, keys, shas, data):
    """The ensemble as a teacher row: its test errors and each member's, measured on this test set
    (a forward pass) and written to the store (teachers/<key>/teacher.json) for `kdrun report`."""
    key = ensemble_keys(ensemble, keys)[0]
    combine = ensemble.spec.combine
    measured = evaluate(model, data.test)
    member_errors, errors = measured["member_test_errors"], measured["test_errors"]
    results = {
        "command": "train", "status": "completed", "dataset": ensemble.dataset.name,
        "label": "ensemble" if len(group) > 1 else "one member",  # a distilled-from-one-member control's teacher
        "teacher": ensemble_name(ensemble, group),
        "student": None, "T": None, "alpha": None, "seed": None, "n_train": len(data.train),
        "n_params": n_params(model), "combine": combine, "teacher_key": key,
        "test_errors": errors, "n_test": len(data.test), "test_accuracy": 1 - errors / len(data.test),
        "train_accuracy": None,
        "members": [{"member": m.where, "key": k, "sha256": s, "test_errors": e, "n_params": n_params(member)}
                    for m, k, s, e, member in zip(group, keys, shas, member_errors, model.members)],
        "members_test_errors_mean": sum(member_errors) / len(member_errors),
    }
    if distributed.is_main():  # under torchrun only rank 0 writes to the store
        path = store.write_record(ensemble.workdir, key, {"combine": combine, "members": keys}, results)
    else:
        path = store.record_path(ensemble.workdir, key)
    return {**results, "run_dir": str(path.parent)}


def _load_ensemble(ensemble, data):
    group = ensemble.members
    models, keys, shas = [], [], []
    for m in group:
        payload, _ = m.check(ensemble.dataset)
        model, sha = load_model(m.path(), data, ensemble.dataset.name, payload.get("name"), payload["arch"])
        models.append(model)
        keys.append(m.key)
        shas.append(sha)
    combine = ensemble.spec.combine
    model = Ensemble(models, combine).eval()
    record = ensemble_record(ensemble, model, group, keys, shas, data)
    # the record travels with every run that uses it: a later evaluation on another test set rewrites the
    # store's copy, not what this run was compared with
    info = {"teacher": record["teacher"], "teacher_key": record["teacher_key"], "teacher_sha256": content_key(shas),
            "teacher_ckpt": None, "teacher_results": record, "combine": combine}
    return model, info, record


# ---------------------------------------------------------------- what commands call


def check(cfg, transfer, overrides=()):
    """Fail before any run starts when the teacher of a command with this config and these overrides
    (or a member) is missing, is not of this dataset and architecture, or its soft-target cache is
    damaged; `transfer` is the transfer set's identity (kdrun.preflight.check_inputs)."""
    check_source(source(cfg, transfer, overrides), overrides)


def check_source(teacher, overrides=()):
    """check() of a TeacherSource."""
    dataset = teacher.dataset
    if teacher.is_ensemble:
        for m in teacher.members:
            m.check(dataset)
        cache_key = ensemble_keys(teacher, [m.key for m in teacher.members])[1]
    else:
        path, cache_key = resolve(teacher)
        # a teacher_ckpt records its architecture; it must match teacher= only when one is typed
        typed = not teacher.ckpt or any(o.partition("=")[0] == "teacher" for o in overrides)
        # a plain state_dict records none: teacher= (or teacher.model overrides) must name it
        named = typed or any(o.partition("=")[0].lstrip("+~").startswith("teacher.model") for o in overrides)
        check_model_payload(path, dataset.name, teacher.name, teacher.arch if typed else None,
                            num_classes=dataset.num_classes, plain_name=teacher.name if named else None,
                            plain_arch=teacher.arch if named else None)
    soft_targets.check_cache(soft_targets.cache_path(teacher.workdir, cache_key, content_key(teacher.data)))


def load(teacher, data):
    """The teacher model (eval mode, on the data's device), what to record about it, and an ensemble's
    record (its test errors and its members'; None for one teacher)."""
    if teacher.is_ensemble:
        return _load_ensemble(teacher, data)
    path, key = resolve(teacher)
    dataset_name = teacher.dataset.name
    if teacher.ckpt:  # the architecture its checkpoint records (checked against a typed teacher= before)
        plain = {"plain_name": teacher.name, "plain_arch": teacher.arch}  # a plain state_dict's (see check)
        name = check_model_payload(path, dataset_name, None, None, num_classes=data.num_classes,
                                   **plain)[0].get("name")
        model, sha256 = load_model(path, data, dataset_name, name, None, **plain)
    else:
        name = teacher.name
        model, sha256 = load_model(path, data, dataset_name, name, teacher.arch)
    return model, {"teacher": name, "teacher_key": key, "teacher_sha256": sha256, "teacher_ckpt": str(path)}, None


def cached_logits(teacher, data):
    """The teacher's logits over the whole train split ([N, C]; an ensemble's members', [N, M, C]),
    from the cache or computed once and cached (under torchrun, by rank 0; the others then read it)."""
    with distributed.rank0_first():
        return _cached_logits(teacher, data)


def _cached_logits(teacher, data):
    model, info, record = load(teacher, data)
    group = record and record["members"]
    if group is None:
        cache_key, forward = info["teacher_key"], model
    else:
        cache_key, forward = ensemble_keys(teacher, [m["key"] for m in group])[1], model.member_logits
    manifest = soft_targets.manifest_for(info["teacher_sha256"], data.transfer, data.num_classes, group)
    cache = soft_targets.cache_path(teacher.workdir, cache_key, content_key(data.transfer))
    logits = soft_targets.get_or_compute(cache, manifest, model, data.train, forward)
    return logits, {**info, "soft_targets": str(cache)}
