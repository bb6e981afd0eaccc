"""What a command's config resolves into, once, at the command's top: the data, each model it trains
(its role: model config and recipe), where the teacher comes from, the objective, and the run's
outputs. The layers below take the part they need, never the whole config."""

from dataclasses import dataclass, replace
from functools import cached_property
from pathlib import Path

from hydra.utils import instantiate
from omegaconf import OmegaConf

from kdrun import store
from kdrun.checkpoint import run_key
from kdrun.data.loading import identify, load_data
from kdrun.devices import resolve_device
from kdrun.io import content_key
from kdrun.objectives.base import needs_of
from kdrun.run_config import run_config

RECIPE_OVERRIDES = {"epochs": "epochs", "batch_size": "batch_size", "lr": "optimizer.lr",  # top-level -> recipe
                    "precision": "precision"}


def teacher_seed(cfg):
    """The seed of the stored teacher a run distils from: `teacher_seed`, or the run's own seed where it
    is `same` (each seed of a sweep with its own teacher)."""
    return cfg.seed if cfg.teacher_seed == "same" else cfg.teacher_seed


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


@dataclass(frozen=True)
class DataPart:
    """The dataset config (load_data records the class names in it), where its files are, the device
    its splits go to, and transfer.* (which rows of the train split a student learns from)."""

    dataset: object
    data_dir: str
    device: str
    transfer: object = None

    @classmethod
    def of(cls, cfg):
        return cls(cfg.dataset, cfg.data_dir, cfg.device, cfg.get("transfer"))

    def load(self):
        return load_data(self, resolve_device(self.device))

    @cached_property
    def identity(self):
        """The train split's identity (its files' hashes or its decoded pixels' hash, subset,
        transform): what the teacher store and the soft-target cache key on; computed once."""
        return identify(self)


@dataclass(frozen=True)
class RolePart:
    """A model a command trains: its role (teacher or student), name, model config and recipe, and
    the loop's speed options for it."""

    role: str
    name: str
    model: object
    recipe: object
    compile: bool = False
    channels_last: bool = False
    val_seed: int = 0  # draws the recipe's validation split (dataset.subset_seed)

    @classmethod
    def of(cls, cfg, role):
        spec = cfg[role]
        dataset = cfg.get("dataset")
        return cls(role, spec.name, spec.model, spec.recipe, bool(cfg.get("compile", False)),
                   bool(cfg.get("channels_last", False)),
                   int(dataset.get("subset_seed", 0)) if dataset is not None else 0)

    @property
    def arch(self):
        return OmegaConf.to_container(self.model, resolve=True)


@dataclass(frozen=True)
class ObjectivePart:
    """The objective (`loss=`, built through its `_target_`), the schedules and constants it records,
    and whether the teacher sees the student's own jittered view (transfer.augment)."""

    loss: object
    T: object = None
    alpha: object = None
    temperature: object = None
    alpha_schedule: object = None
    augment: bool = False
    shifted_views: bool = False  # the student's batches are jittered or flipped
    cache_features: bool = False  # transfer.cache_features

    @classmethod
    def of(cls, cfg):
        transfer = cfg.get("transfer")
        recipe = cfg.student.get("recipe") if cfg.get("student") is not None else None
        shifted = bool(recipe.get("jitter") or recipe.get("flip")) if recipe is not None else False
        return cls(cfg.loss, cfg.get("T"), cfg.get("alpha"), cfg.get("temperature"), cfg.get("alpha_schedule"),
                   bool(transfer.augment) if transfer is not None else False, shifted,
                   bool(transfer.get("cache_features", False)) if transfer is not None else False)

    @property
    def needs(self):
        """What the objective declares it needs (kdrun.objectives.base.Needs)."""
        return needs_of(self.loss)

    @property
    def uses_teacher(self):
        return self.needs.teacher

    @property
    def online(self):
        """Whether the teacher runs on the student's very batch: the objective reads its features, or
        transfer.augment=true pairs the student's jittered view with the teacher's outputs on it."""
        need = self.needs
        return need.teacher and (need.online_teacher or self.augment)

    @property
    def features_cached(self):
        """Whether the teacher's features are computed once over the train split instead of per step
        (transfer.cache_features=true, and the teacher would see the unshifted rows anyway)."""
        return (self.cache_features and self.needs.online_teacher and not self.augment
                and not self.shifted_views)

    def build(self, **kwargs):
        return instantiate(self.loss, **kwargs)


@dataclass(frozen=True)
class TeacherSource:
    """Where the teacher comes from: `teacher_ckpt` (a model.pt or a plain state_dict), else the teacher
    store's entry for this teacher config (`spec`: a model and recipe, or an ensemble's members), the
    dataset's identity (`data`, see DataPart.identity) and the seed."""

    spec: object
    seed: int
    ckpt: object
    workdir: Path
    dataset: object
    data: dict
    members: tuple = ()  # an ensemble's (kdrun.commands.teacher.Member), resolved by teacher.source
    train_command: str = None  # the `kdrun train` line that makes a missing stored teacher

    @classmethod
    def of(cls, cfg, data, seed=None):
        return cls(cfg.teacher, teacher_seed(cfg) if seed is None else int(seed), cfg.get("teacher_ckpt"),
                   Path(cfg.workdir), cfg.dataset, data)

    @property
    def name(self):
        return self.spec.name

    @property
    def is_ensemble(self):
        return "members" in self.spec

    @property
    def arch(self):
        return OmegaConf.to_container(self.spec.model, resolve=True)

    def identity(self):
        return store.identity_of(self.spec, self.dataset, self.seed, self.data)

    @property
    def key(self):
        return content_key(self.identity())

    def with_spec(self, spec, seed):
        """A stored teacher of this dataset with another config and seed (an ensemble's member)."""
        return replace(self, spec=spec, seed=int(seed), ckpt=None, members=(), train_command=None)


@dataclass(frozen=True)
class OutputsPart:
    """Where a run writes and what it records: its run dir, command, seed, dataset name, whether it
    resumes its checkpoint, progress bars, and the config it records (`recorded`: results.json's
    `config` and the checkpoint's key, resolved when written, after load_data has named the classes)."""

    run_dir: Path
    command: str
    seed: int
    dataset: str
    resume: bool
    progress: object
    recorded: object

    @classmethod
    def of(cls, cfg, run_dir):
        return cls(Path(run_dir), cfg.command, cfg.seed, cfg.dataset.name, bool(cfg.get("resume")), cfg.progress, cfg)

    def config(self):
        return run_config(self.recorded)

    def key(self):
        return run_key(self.recorded)

    def at(self, run_dir):
        return replace(self, run_dir=Path(run_dir))
