"""`kdrun evaluate`: a model (`ckpt=PATH`) or the teacher (one, or an ensemble) on the test set."""

from pathlib import Path

import torch

from kdrun.commands import teacher
from kdrun.commands.common import check_inputs, check_model_payload, load_data, load_model, n_params, resolve_device, save_config
from kdrun.errors import KdrunError
from kdrun.io import write_json
from kdrun.loop import predict
from kdrun.report import markdown_table
from kdrun.run_config import run_config


def preflight(cfg, overrides=()):
    transfer = check_inputs(cfg)
    if cfg.ckpt:
        _checked(cfg)
    else:
        teacher.check(cfg, transfer, overrides)


def _checked(cfg):
    path = Path(cfg.ckpt)
    if not path.is_file():
        raise KdrunError(f"checkpoint not found: {path}")
    return path, check_model_payload(path, cfg.dataset.name, None, None, "model", cfg.dataset.num_classes)[0]


def _model(cfg, data):
    if not cfg.ckpt:
        model, info, record = teacher.load(cfg, data)
        return model, info["teacher"], record
    path, payload = _checked(cfg)
    model, _ = load_model(path, data, cfg.dataset.name, payload.get("name"), payload["arch"], role="model")
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
    data = load_data(cfg, resolve_device(cfg.device))
    model, name, record = _model(cfg, data)
    logits = predict(model, data.test)
    errors = int((logits.argmax(1) != data.test.labels).sum())
    classes, confusion = per_class(logits, data.test.labels, list(cfg.dataset.classes))
    results = {"command": "evaluate", "status": "completed", "model": name, "ckpt": cfg.ckpt, "dataset": cfg.dataset.name,
               "test_errors": errors, "n_test": len(data.test), "test_accuracy": 1 - errors / len(data.test),
               "n_params": n_params(model), "per_class": classes, "confusion": confusion, "run_dir": str(run_dir),
               "config": run_config(cfg)}
    if record is not None:
        results["members"] = record["members"]
    write_json(Path(run_dir) / "results.json", results)
    print(f"{name} on {cfg.dataset.name}: {errors} test errors of {len(data.test)} "
          f"(accuracy {results['test_accuracy']:.4f}), {results['n_params']:,} parameters")
    if record is not None:
        print("members: " + ", ".join(f"{m['member']} {m['test_errors']}" for m in record["members"]))
    print("\n" + markdown_table(classes, [("class", "class"), ("name", "name"), ("n", "n"), ("errors", "errors"),
                                          ("accuracy", "accuracy")]))
    return results
