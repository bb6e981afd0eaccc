"""A run directory's config.yaml, metrics.jsonl and model.pt (checkpoints: kdrun.checkpoint); each epoch's
row also goes to the trackers `logger=...` chose (kdrun.tracking)."""

import json
import logging
import os
from pathlib import Path

from omegaconf import OmegaConf

from kdrun import __version__, tracking
from kdrun.io import atomic_write, save_torch

log = logging.getLogger("kdrun")
NOT_TERMS = {"lr", "T", "alpha", "train_accuracy", "test_accuracy", "val_accuracy", "seconds"}  # metrics rows' other floats


def save_model(path, model, arch, dataset, num_classes, extra):
    """A kdrun model.pt: weights plus what rebuilds them (see kdrun.model_files.load_model); `num_classes`
    is the number of outputs the model was built with."""
    save_torch(path, {"model": model.state_dict(), "arch": arch, "dataset": dataset,
                      "num_classes": int(num_classes), "kdrun_version": __version__, **extra})


def save_config(cfg, run_dir):
    atomic_write(Path(run_dir) / "config.yaml", lambda f: f.write(OmegaConf.to_yaml(cfg, resolve=True)), mode="w")


def target_name(node):
    """The class a config node builds (`kdrun.objectives.HintonKD` -> HintonKD), for results."""
    return node._target_.rsplit(".", 1)[-1]


class Recorder:
    """metrics.jsonl (one row per epoch), the log line of each epoch, and the trackers' run of this dir."""

    def __init__(self, run_dir, name):
        self.dir = Path(run_dir)
        self.name = name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.dir / "metrics.jsonl"
        self.tracked = tracking.run_for(self.dir)  # None when nothing is tracked

    def keep_epochs(self, n):
        """Keep the rows of the first n epochs: none for a fresh run (into a reused dir too), the
        checkpoint's for a resumed one (a row written after the checkpoint is written again)."""
        if self.tracked is not None:
            self.tracked.resumed_at(n)
        if not self.metrics_path.exists():
            return
        rows = self.metrics_path.read_text().splitlines()[:n]
        atomic_write(self.metrics_path, lambda f: f.write("".join(r + "\n" for r in rows)), mode="w")

    def epoch_end(self, row):
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())
        terms = " ".join(f"{k}={v:.4f}" for k, v in row.items() if k not in NOT_TERMS and isinstance(v, float))
        train_acc = "-" if row["train_accuracy"] is None else f"{row['train_accuracy']:.4f}"
        val = f" val_errors={row['val_errors']}/{row['n_val']}" if "val_errors" in row else ""
        log.info("%s epoch %d: %s train_acc=%s%s test_errors=%d/%d lr=%.3g (%.1fs)", self.name, row["epoch"],
                 terms, train_acc, val, row["test_errors"], row["n_test"], row["lr"], row["seconds"])
        if self.tracked is not None:
            self.tracked.epoch_end(row)
