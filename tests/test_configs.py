"""Every config in conf/ composes and builds, in this process and on the meta device (no data, no
memory, no training): each command's primary config as it is, and every option of every config group
(the folders of conf/, read when the tests are collected, so a new yaml file is tested as it lands)."""

import inspect

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import get_class, instantiate
from omegaconf import OmegaConf, open_dict

from kdrun.cli import COMMANDS, conf_dir
from kdrun.parts import RolePart
from kdrun.preflight import check_buildable
from kdrun.objectives import CachedLogits
from kdrun.objectives.base import needs_of

CONF = conf_dir()
GROUPS = sorted(p.name for p in CONF.iterdir() if p.is_dir())
# groups a user reaches through teacher= and student= (their configs pick a model and a recipe)
THROUGH_ROLES = {"model", "recipe"}
ROLES = ("teacher", "student")
# values a dataset config leaves to the user (`???`), filled here so that it composes
PLACEHOLDERS = {"num_classes": 10, "root": "images"}


def options(group):
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def primary_default(primary, group):
    """The option of `group` that a primary config's defaults list picks (None: none)."""
    for entry in OmegaConf.load(CONF / f"{primary}.yaml").get("defaults", []):
        if isinstance(entry, dict) and group in entry:
            return entry[group]
    return None


def primary_for(group, option):
    """The primary config an option is composed with: the command whose defaults pick it (a command's own
    loss, say), else `distill`, which has every group."""
    for primary, _ in COMMANDS.values():
        if primary_default(primary, group) == option:
            return primary
    return "distill"


@pytest.fixture(scope="module")
def hydra():
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        yield


def composed(primary, overrides=(), **kwargs):
    cfg = compose(config_name=primary, overrides=list(overrides), **kwargs)
    missing = [key for key in cfg.dataset if OmegaConf.is_missing(cfg.dataset, key)]
    if missing:
        unknown = [k for k in missing if k not in PLACEHOLDERS]
        assert not unknown, f"dataset.{unknown[0]} is ??? and has no placeholder in this test's PLACEHOLDERS"
        filled = [*overrides, *(f"dataset.{k}={PLACEHOLDERS[k]}" for k in missing)]
        cfg = compose(config_name=primary, overrides=filled, **kwargs)
    return cfg


def build_roles(cfg):
    """The teacher's and the student's models (an ensemble's members are teacher options of their own),
    with their optimizers and lr schedules, on the meta device, run on a batch of the dataset's shape."""
    check_buildable(cfg.dataset, [RolePart.of(cfg, role) for role in ROLES if "model" in cfg[role]])


def build_on_some_dataset(cfg, primary, overrides):
    """Models fit some datasets only (a 3-channel torchvision model, say): built as `cfg` (composed from
    `primary` and `overrides`) has them, else with the first dataset option that they take."""
    errors = []
    for dataset in [None, *options("dataset")]:
        if dataset is not None:
            cfg = composed(primary, [*overrides, f"dataset={dataset}"])
        try:
            build_roles(cfg)
            return cfg.dataset.name
        except Exception as e:  # noqa: BLE001  the message goes into the failure below
            errors.append(f"{dataset or 'default dataset'}: {e}")
    pytest.fail(f"{overrides} builds with no dataset option:\n" + "\n".join(errors))


def build_objective(cfg):
    """The `loss` objective, on the meta device, as kdrun's preflight builds it: given a teacher's
    logits when it declares that it uses a teacher, and None for what else the command gives it at run
    time (the arguments its config does not set: self-distillation's training pixels, say)."""
    if "loss" not in cfg:
        return None
    target = get_class(cfg.loss._target_)
    kwargs = {}
    for name, p in inspect.signature(target).parameters.items():
        if name in cfg.loss or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        if name == "teacher" and needs_of(cfg.loss).teacher:
            kwargs[name] = CachedLogits(None)
        elif p.default is inspect.Parameter.empty:
            kwargs[name] = None
    with torch.device("meta"):
        objective = instantiate(cfg.loss, **kwargs)
    assert isinstance(objective, torch.nn.Module), cfg.loss._target_
    return objective


@pytest.mark.parametrize("command", list(COMMANDS))
def test_each_command_primary_config_composes_and_builds(hydra, command):
    primary = COMMANDS[command][0]
    cfg = composed(primary)
    assert cfg.command == command
    build_roles(cfg)
    build_objective(cfg)


CASES = [(group, option) for group in GROUPS if group not in THROUGH_ROLES for option in options(group)]


@pytest.mark.parametrize("group, option", CASES, ids=[f"{g}={o}" for g, o in CASES])
def test_every_option_of_every_group_composes_and_builds(hydra, group, option):
    primary = primary_for(group, option)
    cfg = composed(primary, [f"{group}={option}"], return_hydra_config=True)
    assert cfg.hydra.runtime.choices[group] == option
    build_on_some_dataset(cfg, primary, [f"{group}={option}"])
    build_objective(cfg)


MODEL_CASES = [(role, option) for option in options("model") for role in ROLES]


@pytest.mark.parametrize("role, option", MODEL_CASES, ids=[f"{r}.model={o}" for r, o in MODEL_CASES])
def test_every_model_config_builds_as_teacher_and_student(hydra, role, option):
    """conf/model/NAME.yaml in place of the role's model (its interpolations resolved against the whole
    config, as `teacher=` / `student=` configs that pick it resolve them)."""
    errors = []
    for dataset in options("dataset"):
        cfg = composed("distill", [f"dataset={dataset}"])
        with open_dict(cfg):
            cfg[role].model = OmegaConf.load(CONF / "model" / f"{option}.yaml")
        try:
            check_buildable(cfg.dataset, [RolePart.of(cfg, role)])
            return
        except Exception as e:  # noqa: BLE001  the message goes into the failure below
            errors.append(f"{dataset}: {e}")
    pytest.fail(f"model {option} builds as {role} with no dataset option:\n" + "\n".join(errors))


RECIPE_CASES = [(role, option) for option in options("recipe") for role in ROLES]


@pytest.mark.parametrize("role, option", RECIPE_CASES, ids=[f"{r}.recipe={o}" for r, o in RECIPE_CASES])
def test_every_recipe_builds_its_optimizer_and_schedule(hydra, role, option):
    cfg = composed("distill", [f"recipe@{role}.recipe={option}"])
    assert cfg[role].recipe.optimizer._target_
    check_buildable(cfg.dataset, [RolePart.of(cfg, role)])


def test_the_groups_are_read_from_the_folders():
    assert {"teacher", "student", "dataset", "loss", "model", "recipe"} <= set(GROUPS)
    assert len(CASES) >= sum(len(options(g)) for g in ("teacher", "student", "dataset", "loss"))
