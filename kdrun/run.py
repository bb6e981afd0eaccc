"""A run directory: metrics.jsonl, checkpoints/last.pt, model.pt and results.json."""

import json
import logging
import os
from pathlib import Path

import torch

from kdrun import __version__
from kdrun.io import save_torch

log = logging.getLogger("kdrun")
NOT_TERMS = {"lr", "T", "alpha", "train_accuracy", "test_accuracy", "seconds"}  # metrics rows' other floats


def save_model(path, model, arch, dataset, extra):
    """A kdrun model.pt: weights plus what rebuilds them (see commands.common.load_model)."""
    save_torch(path, {"model": model.state_dict(), "arch": arch, "dataset": dataset,
                      "num_classes": model.head.out_features, "kdrun_version": __version__, **extra})


class Recorder:
    def __init__(self, run_dir, name):
        self.dir = Path(run_dir)
        self.name = name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.dir / "metrics.jsonl"
        self.checkpoint_path = self.dir / "checkpoints" / "last.pt"
        self.metrics_path.unlink(missing_ok=True)  # a run into a reused hydra.run.dir starts afresh

    def epoch_end(self, row, model, optimizer, scheduler, generator):
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())
        save_torch(self.checkpoint_path, {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "epoch": row["epoch"],
            "step": row["step"],
            "rng": {"torch": torch.get_rng_state(), "data": generator.get_state()},
            "kdrun_version": __version__,
        })
        terms = " ".join(f"{k}={v:.4f}" for k, v in row.items() if k not in NOT_TERMS and isinstance(v, float))
        train_acc = "-" if row["train_accuracy"] is None else f"{row['train_accuracy']:.4f}"
        log.info("%s epoch %d: %s train_acc=%s test_errors=%d/%d lr=%.3g (%.1fs)", self.name, row["epoch"],
                 terms, train_acc, row["test_errors"], row["n_test"], row["lr"], row["seconds"])
