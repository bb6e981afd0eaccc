"""`kdrun specialists` (Hinton et al. 2015, section 5): a generalist, then one specialist per cluster of
classes it confuses, each with a dustbin class, then per-example inference that combines them.

generalist (teacher=, trained on the train split minus transfer.val_size held-out examples)
  -> its predictions on the held-out examples -> K-means on the columns of their covariance
  -> per cluster: a specialist initialised from the generalist, trained on its classes plus as many
     others (its dustbin), the dustbin logit raised by log(how much the dustbin was under-sampled)
  -> on the test set: the generalist's top-n classes pick the active specialists, and per example
     the distribution minimising KL(p_g || q) + sum of KL(p_m || dustbin-collapsed q).
Generalist and specialists go to the teacher store, so `-m specialists.only=0,1,...` trains the
specialists as parallel jobs and a last plain run combines them."""

import logging
from pathlib import Path

import torch
from omegaconf import OmegaConf

from kdrun import store
from kdrun.commands import teacher
from kdrun.commands.distill import check_val_size
from kdrun.data.loading import Data
from kdrun.data.transfer import select_rows
from kdrun.errors import KdrunError
from kdrun.io import atomic_write, content_key, write_json
from kdrun.loop import predict
from kdrun.model_files import load_model
from kdrun.objectives import CrossEntropy
from kdrun.parts import DataPart, OutputsPart, RolePart, TeacherSource, fold_recipe_overrides
from kdrun.preflight import check_buildable, check_inputs
from kdrun.report import markdown_table
from kdrun.run import save_config
from kdrun.training import train_model
from kdrun.specialists.clusters import cluster_classes
from kdrun.specialists.combine import active_specialists, combine
from kdrun.specialists.dustbin import Specialty
from kdrun.specialists.heads import init_from_generalist

log = logging.getLogger("kdrun")


def preflight(cfg, overrides=()):
    transfer = check_inputs(cfg)
    if teacher.is_ensemble(cfg):
        raise KdrunError("kdrun specialists trains its own generalist: teacher= must name one model, not an ensemble")
    found = check_buildable(cfg.dataset, [RolePart.of(fold_recipe_overrides(cfg, ["teacher"]), "teacher")])
    found["teacher"].require("kdrun specialists", bias=True)
    check_val_size(cfg, transfer["n"])


def run(cfg, run_dir):
    cfg = fold_recipe_overrides(cfg, ["teacher"])
    save_config(cfg, run_dir)
    run_dir = Path(run_dir)
    source, role, outputs = DataPart.of(cfg), RolePart.of(cfg, "teacher"), OutputsPart.of(cfg, run_dir)
    settings, held_out = cfg.specialists, source.transfer.val_size
    data = source.load()
    scfg = _specialist_cfg(cfg)  # after load_data has named the classes, which its results record
    specialist_role, specialist_outputs = RolePart.of(scfg, "teacher"), OutputsPart.of(scfg, run_dir)
    rows = select_rows(data.train.labels.cpu(), source.transfer, source.dataset.subset_seed)
    stored = TeacherSource.of(cfg, data.transfer, seed=outputs.seed)
    generalist, generalist_key, generalist_sha = _generalist(stored, role, outputs.at(run_dir / "generalist"), data,
                                                             rows.train, held_out)
    held_out_p = torch.softmax(predict(generalist, data.train.subset(rows.val)), dim=1)
    clusters = cluster_classes(held_out_p.cpu(), settings.k, settings.min_size, outputs.seed)
    clusters = [c for c in clusters if len(c) < data.num_classes]  # all classes in one: no dustbin, no specialist
    if not clusters:
        raise KdrunError(f"no cluster has specialists.min_size={settings.min_size} classes or more; "
                         "try a smaller specialists.k")
    specialties = [Specialty(tuple(c), data.num_classes) for c in clusters]
    names = list(source.dataset.classes)
    for i, s in enumerate(specialties):
        log.info("specialist %d: %s", i, ", ".join(names[c] for c in s.classes))
    only = settings.only
    if only is not None and only >= len(specialties):
        raise KdrunError(f"specialists.only={only}, but the clustering gave {len(specialties)} specialists "
                         f"(0..{len(specialties) - 1})")
    chosen = range(len(specialties)) if only is None else [only]
    trained = {i: _specialist(specialist_role, specialist_outputs.at(run_dir / f"specialist_{i}"), stored.workdir,
                              data, rows.train, generalist, generalist_sha, specialties[i])
               for i in chosen}
    base = {"command": "specialists", "status": "completed", "dataset": outputs.dataset, "generalist": role.name,
            "generalist_key": generalist_key, "clusters": [[names[c] for c in s.classes] for s in specialties],
            "cluster_classes": clusters, "specialists": [trained[i][1] for i in chosen], "run_dir": str(run_dir),
            "config": outputs.config()}
    if only is not None:
        write_json(run_dir / "results.json", {**base, "only": only})
        return base
    results = {**base, **score(generalist, [trained[i][0] for i in chosen], specialties, data.test, settings)}
    write_json(run_dir / "results.json", results)
    text = render(results, cfg)
    atomic_write(run_dir / "report.md", lambda f: f.write(text), mode="w")
    print(text)
    return results


def _generalist(stored, role, outputs, data, train_rows, held_out):
    """(model, key, sha256) of the teacher (`stored`: its TeacherSource) trained on the train split
    minus the `held_out` rows: from the store, or trained now (once, when parallel jobs ask for it
    together)."""
    identity = {**stored.identity(), "held_out": held_out}
    key = content_key(identity)

    def train(checkpointer):
        extra = {"teacher": role.name, "held_out": held_out, "teacher_key": key}
        return train_model(role, outputs, CrossEntropy(), data, data.train.subset(train_rows),
                           data.train.device, extra, saved_as={"role": "generalist"}, checkpointer=checkpointer)[0]

    path, trained = store.train_or_reuse(stored.workdir, key, identity, train)
    if trained is None:
        log.info("generalist %s (key %s) is already trained: %s", role.name, key, path)
    model, sha256 = load_model(path, data, outputs.dataset, role.name, role.arch)
    return model, key, sha256


def _specialist_cfg(cfg):
    """The generalist's config with the specialists' recipe changes."""
    out = cfg.copy()
    out.teacher.recipe.epochs = cfg.specialists.recipe.epochs
    if cfg.specialists.recipe.lr is not None:
        out.teacher.recipe.optimizer.lr = cfg.specialists.recipe.lr
    return out


def _specialist(role, outputs, workdir, data, train_rows, generalist, generalist_sha, specialty):
    """(model, summary) of the specialist for `specialty` (`role`: the generalist's with the specialists'
    recipe), trained now unless the store has it (it is keyed by the generalist's weights, so a
    retrained generalist gets new specialists)."""
    identity = {"specialist_of": generalist_sha, "classes": list(specialty.classes),
                "recipe": OmegaConf.to_container(role.recipe, resolve=True), "seed": outputs.seed}
    key = content_key(identity)
    labels = data.train.labels[train_rows]
    picked, shift = specialty.training_rows(labels.cpu(), torch.Generator().manual_seed(outputs.seed))
    rows = train_rows[picked.to(train_rows.device)]
    arch = role.arch
    local = Data(relabelled(data.train, rows, specialty), relabelled(data.test, None, specialty), data.shape,
                 specialty.n_outputs, data.transfer)

    def train(checkpointer):
        extra = {"teacher": role.name, "classes": list(specialty.classes), "dustbin_shift": shift,
                 "teacher_key": key, "generalist_sha256": generalist_sha}
        return train_model(role, outputs, CrossEntropy(), local, local.train, data.train.device, extra,
                           init=lambda model: init_from_generalist(model, generalist, specialty.classes,
                                                                  arch.get("head")),
                           saved_as={"role": "specialist", "classes": list(specialty.classes)},
                           checkpointer=checkpointer)[0]

    path, _ = store.train_or_reuse(workdir, key, identity, train)
    model = load_model(path, local, outputs.dataset, role.name, arch)[0]
    own = store.stored_results(workdir, key)
    # errors on its own task (its classes and the dustbin, test set), before the dustbin shift
    summary = {"classes": list(specialty.classes), "key": key, "n_train": len(rows), "dustbin_shift": shift,
               "own_task_test_errors": own.get("test_errors")}
    return _Shifted(model, specialty.dustbin, shift), summary


def relabelled(split, rows, specialty):
    """Rows of a split (all when None) with labels mapped to the specialist's outputs (others: dustbin),
    held as the split is (in memory or streamed); its batches index these rows."""
    part = split.subset(torch.arange(len(split)) if rows is None else rows)
    part.labels, part.rows = specialty.to_local(part.labels), None
    return part


class _Shifted(torch.nn.Module):
    """A specialist with its dustbin logit raised by `shift` (undoing the dustbin's under-sampling)."""

    def __init__(self, model, dustbin, shift):
        super().__init__()
        self.model = model
        offset = torch.zeros(dustbin + 1)
        offset[dustbin] = shift
        self.register_buffer("offset", offset.to(next(model.parameters()).device))

    def forward(self, x):
        return self.model(x) + self.offset


def score(generalist, specialists, specialties, test, settings):
    """Test errors of the generalist alone and combined with the specialists, and the paper's Table 4:
    the change in correct answers split by how many specialists cover the true class."""
    p_g = torch.softmax(predict(generalist, test), dim=1).cpu()
    p_m = [torch.softmax(predict(m, test), dim=1).cpu() for m in specialists]
    active = active_specialists(p_g, specialties, settings.top_n)
    q = combine(p_g, p_m, specialties, active, max_iter=settings.max_iter)
    labels = test.labels.cpu()
    right_g, right_q = p_g.argmax(1) == labels, q.argmax(1) == labels
    covering = torch.stack([torch.isin(labels, torch.tensor(s.classes)) for s in specialties], 1).sum(1)
    table = []
    for n in range(int(covering.max()) + 1 if len(labels) else 0):
        rows = covering == n
        g, c = int(right_g[rows].sum()), int(right_q[rows].sum())
        table.append({"covering": n, "n_test": int(rows.sum()), "generalist_correct": g, "combined_correct": c,
                      "delta_correct": c - g, "relative_accuracy_change": (c - g) / g if g else None})
    return {"n_test": len(labels), "generalist_test_errors": int((~right_g).sum()),
            "test_errors": int((~right_q).sum()), "n_active": int(active.any(1).sum()), "by_covering": table}


def render(results, cfg):
    s = results
    n = s["n_test"]
    lines = [f"# kdrun specialists: {cfg.teacher.name} generalist on {cfg.dataset.name}", "",
             f"Clusters of the generalist's held-out predictions (K-means, k={cfg.specialists.k}, "
             f"min_size={cfg.specialists.min_size}, on {cfg.transfer.val_size} held-out training examples):", ""]
    lines += [f"- specialist {i}: {', '.join(c)} (trained on {sp['n_train']} examples; dustbin logit "
              f"+{sp['dustbin_shift']:.2f})" for i, (c, sp) in enumerate(zip(s["clusters"], s["specialists"]))]
    table = [{"model": "generalist", "errors": s["generalist_test_errors"], "acc": 1 - s["generalist_test_errors"] / n},
             {"model": f"generalist + {len(s['specialists'])} specialists (top_n={cfg.specialists.top_n})",
              "errors": s["test_errors"], "acc": 1 - s["test_errors"] / n}]
    lines += ["", markdown_table(table, [("model", "model"), (f"test errors (of {n})", "errors"), ("test acc", "acc")]),
              "", f"Examples with an active specialist: {s['n_active']} of {n}.", "",
              "By how many specialists cover the true class (the paper's Table 4; K-means gives disjoint "
              "clusters, so here a class has 0 or 1, where the paper's 61 JFT specialists overlapped):", "",
              markdown_table(s["by_covering"], [("specialists covering", "covering"), ("test examples", "n_test"),
                                                ("generalist correct", "generalist_correct"),
                                                ("combined correct", "combined_correct"), ("change", "delta_correct"),
                                                ("relative accuracy change", "relative_accuracy_change")])]
    return "\n".join(lines) + "\n"

