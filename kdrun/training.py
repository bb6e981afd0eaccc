"""Training one model to a run dir: the objective attached to the model, the role's recipe (optimizer,
schedule, epochs) through the one loop (kdrun.loop.fit), and what the run dir keeps of it (model.pt,
results.json). `role` is a kdrun.parts.RolePart, `outputs` a kdrun.parts.OutputsPart."""

import torch
from hydra.utils import instantiate

from kdrun.checkpoint import Checkpointer
from kdrun.data.transfer import held_out
from kdrun.io import write_json
from kdrun.loop import fit
from kdrun.models.build import build_model, feature_paths, head_path
from kdrun.models.features import PENULTIMATE, FeatureTap, resolve_stages
from kdrun.run import Recorder, save_model


def n_params(model):
    return sum(p.numel() for p in model.parameters())


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


def fit_role(role, outputs, model, objective, data, train_set, checkpointer=None, val=None):
    """Train `model` (on its device) on `train_set` with `objective` and the role's recipe, recording
    each epoch in outputs.run_dir and checkpointing to `checkpointer` (default:
    run_dir/checkpoints/last.pt, resumed when outputs.resume). Each epoch also logs the errors on `val`,
    or, when the recipe has a val_size, on that many examples carved from `train_set` (never trained
    on). Returns (the last epoch's metrics row, seconds)."""
    recipe = role.recipe
    if val is None and recipe.get("val_size"):
        train_set, val = held_out(train_set, int(recipe.val_size), role.val_seed, f"{role.role}.recipe.val_size")
    own = attach_objective(role.model, model, objective, data.shape, len(data.train))
    params = [{"params": list(model.parameters())}, *own] if own else model.parameters()
    optimizer = instantiate(recipe.optimizer)(params)  # configs are partials
    steps = recipe.epochs * train_set.n_batches(recipe.batch_size)
    scheduler = instantiate(recipe.scheduler)(optimizer, total_steps=steps)
    generator = torch.Generator().manual_seed(outputs.seed)
    recorder = Recorder(outputs.run_dir, f"{outputs.command}:{role.name}")
    if checkpointer is None:
        checkpointer = Checkpointer(outputs.run_dir / "checkpoints" / "last.pt", outputs.key(),
                                    f"kdrun {outputs.command} of {role.name}, seed {outputs.seed}", outputs.resume)
    return fit(model, objective, train_set, data.test, optimizer, scheduler, epochs=recipe.epochs,
               batch_size=recipe.batch_size, jitter=recipe.jitter, flip=recipe.get("flip", False), generator=generator,
               recorder=recorder, checkpointer=checkpointer, progress=outputs.progress,
               precision=recipe.get("precision", "fp32"), compile=role.compile, channels_last=role.channels_last,
               val=val)


def train_model(role, outputs, objective, data, train_set, device, extra_results, init=None, saved_as=None,
                checkpointer=None, val=None):
    """Build the role's model (teacher or student), start it from `init(model)` if given, train it on
    `train_set` with `objective`, save its artifacts (model.pt records `saved_as`, default the role).
    Returns (results, trained model)."""
    torch.manual_seed(outputs.seed)
    model = build_model(role.model, data.num_classes)
    if init is not None:
        init(model)
    model = model.to(device)
    last, seconds = fit_role(role, outputs, model, objective, data, train_set, checkpointer, val)
    return save_trained(role, outputs, model, last, seconds, train_set, extra_results, data.num_classes,
                        saved_as), model


def save_trained(role, outputs, model, last, seconds, train_set, extra_results, num_classes, saved_as=None):
    """model.pt and results.json of a model trained with the role's recipe (built with `num_classes`
    outputs); returns the results."""
    recipe = role.recipe
    model_path = outputs.run_dir / "model.pt"
    save_model(model_path, model, role.arch, outputs.dataset, num_classes,
               {"name": role.name, "role": role.role, **(saved_as or {})})
    results = {
        "command": outputs.command, "status": "completed", "dataset": outputs.dataset,
        "seed": outputs.seed, "epochs": recipe.epochs, "lr": recipe.optimizer.lr, "batch_size": recipe.batch_size,
        "n_train": last.get("n_train", len(train_set)), "n_params": n_params(model),
        "wall_s": round(seconds, 3), "run_dir": str(outputs.run_dir), "model": str(model_path),
        "train_accuracy": last.get("train_accuracy"),
        **{k: last[k] for k in ("test_accuracy", "test_errors", "n_test")},
        **({"val_errors": last["val_errors"], "n_val": last["n_val"]} if "val_errors" in last else {}),
        **extra_results, "config": outputs.config(),
    }
    write_json(outputs.run_dir / "results.json", results)
    return results
