"""`kdrun evaluate`: a model (`ckpt=PATH`) or the teacher (one, or an ensemble) on the test set."""

from pathlib import Path

import torch

from kdrun.commands import teacher
from kdrun.errors import KdrunError
from kdrun.io import write_json
from kdrun.loop import predict
from kdrun.model_files import check_model_payload, load_model
from kdrun.parts import DataPart, OutputsPart
from kdrun.preflight import check_inputs
from kdrun.report import markdown_table
from kdrun.run import save_config
from kdrun.training import n_params


def preflight(cfg, overrides=()):
    transfer = check_inputs(cfg)
    if cfg.ckpt:
        _checked(cfg.ckpt, cfg.dataset)
    else:
        teacher.check(cfg, transfer, overrides)


def _checked(ckpt, dataset):
    path = Path(ckpt)
    if not path.is_file():
        raise KdrunError(f"checkpoint not found: {path}")
    return path, check_model_payload(path, dataset.name, None, None, "model", dataset.num_classes)[0]


def _model(ckpt, taught_by, dataset, data):
    """The model `ckpt=` names, else the teacher (`taught_by`, a TeacherSource): (model, name, an
    ensemble's record or None)."""
    if not ckpt:
        model, info, record = teacher.load(taught_by, data)
        return model, info["teacher"], record
    path, payload = _checked(ckpt, dataset)
    model, _ = load_model(path, data, dataset.name, payload.get("name"), payload["arch"], role="model")
    return model, payload.get("name", path.name), None


def per_class(logits, labels, names):
    """Accuracy and errors of each class, and the confusion matrix (rows: true class, columns: predicted)."""
    C = logits.shape[1]
    confusion = torch.zeros(C, C, dtype=torch.long)
    confusion.index_put_((labels.cpu(), logits.argmax(1).cpu()), torch.ones(len(labels), dtype=torch.long), accumulate=True)
    n = confusion.sum(1)
    correct = confusion.diagonal()
    classes = [{"class": c, "name": names[c], "n": int(n[c]), "errors": int(n[c] - correct[c]),
                "accuracy": float(correct[c] / n[c]) if n[c] else None} for c in range(C)]
    return classes, confusion.tolist()


def run(cfg, run_dir):
    save_config(cfg, run_dir)
    source, outputs = DataPart.of(cfg), OutputsPart.of(cfg, run_dir)
    data = source.load()
    taught_by = None if cfg.ckpt else teacher.source(cfg, data.transfer)
    model, name, record = _model(cfg.ckpt, taught_by, source.dataset, data)
    logits = predict(model, data.test)
    errors = int((logits.argmax(1) != data.test.labels).sum())
    classes, confusion = per_class(logits, data.test.labels, list(source.dataset.classes))
    results = {"command": "evaluate", "status": "completed", "model": name, "ckpt": cfg.ckpt, "dataset": outputs.dataset,
               "test_errors": errors, "n_test": len(data.test), "test_accuracy": 1 - errors / len(data.test),
               "n_params": n_params(model), "per_class": classes, "confusion": confusion, "run_dir": str(run_dir),
               "config": outputs.config()}
    if record is not None:
        results["members"] = record["members"]
    write_json(Path(run_dir) / "results.json", results)
    print(f"{name} on {outputs.dataset}: {errors} test errors of {len(data.test)} "
          f"(accuracy {results['test_accuracy']:.4f}), {results['n_params']:,} parameters")
    if record is not None:
        print("members: " + ", ".join(f"{m['member']} {m['test_errors']}" for m in record["members"]))
    print("\n" + markdown_table(classes, [("class", "class"), ("name", "name"), ("n", "n"), ("errors", "errors"),
                                          ("accuracy", "accuracy")]))
    return results
