"""What the commands' preflights check before a run starts, beyond kdrun.validate's values: the device
and the dataset on disk, and that each model, its recipe and the objective can be built."""

import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from kdrun.data.loading import check_data
from kdrun.devices import resolve_device
from kdrun.errors import KdrunError, first_line
from kdrun.models import capabilities
from kdrun.models.build import build_model, head_path
from kdrun.parts import DataPart, RolePart, fold_recipe_overrides


def check_inputs(cfg):
    """What every command checks first: the device exists, and the dataset is there with sound files.
    Returns the identity of the transfer set."""
    resolve_device(cfg.device)
    return check_data(DataPart.of(cfg))


def check_buildable(dataset, roles):
    """Build each role's model (kdrun.parts.RolePart; on the meta device: no memory, no compute), run it
    on a dummy batch of the dataset's shape, and build its optimizer and lr schedule, so that a bad value
    is refused before a run starts rather than after. Returns {role name: the model's Capabilities}."""
    found = {}
    for role in roles:
        try:
            with torch.device("meta"):
                model = build_model(role.model, dataset.num_classes)
            capabilities.check_forward(model, dataset.shape, dataset.num_classes)
            optimizer = instantiate(role.recipe.optimizer)(model.parameters())
            instantiate(role.recipe.scheduler)(optimizer, total_steps=1)
            found[role.role] = capabilities.detect(model, head_path(role.model))
        except Exception as e:
            raise KdrunError(f"invalid {role.role} config: {first_line(e.__cause__ or e)}") from None
    return found


def check_without_teacher(cfg, objective_key, **build):
    """Preflight of the commands that learn from labels with no teacher (self-distill, mutual): the
    data, the student, the objective config at `objective_key` (built with `build`), and transfer.*,
    which may pick rows but not drop labels or ask for a teacher."""
    check_inputs(cfg)
    for key, value in (("labels", True), ("augment", False), ("bias_correction", False)):
        if cfg.transfer[key] != value:
            raise KdrunError(f"transfer.{key}={str(cfg.transfer[key]).lower()} is for kdrun distill; kdrun {cfg.command} "
                             "trains on labels, with no teacher")
    found = check_buildable(cfg.dataset, [RolePart.of(fold_recipe_overrides(cfg, ["student"]), "student")])
    try:
        objective = instantiate(OmegaConf.select(cfg, objective_key), **build)
    except Exception as e:
        raise KdrunError(f"invalid {objective_key} config: {first_line(e.__cause__ or e)}") from None
    if "penultimate" in (getattr(objective, "student_features", None) or ()):  # the head's input
        found["student"].require(f"kdrun {cfg.command} (its penultimate features, the head's input)")
