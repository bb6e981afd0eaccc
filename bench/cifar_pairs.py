"""Seconds per training step of each CIFAR-100 pair preset's KD run (kdrun pipeline experiment=cifar100_*),
and what one epoch and the full recipe imply.

    python bench/cifar_pairs.py [--steps 3] [--device cpu|cuda] [--out cifar_pairs.json]

Each pair's `kd` run is composed exactly as the pipeline composes it (its preset, batch 64, crops and
flips, the teacher online on the student's view) and trained through kdrun's loop (kdrun.loop.fit) on
random images for two epochs of `--steps` steps each; the second epoch is timed (the first pays for
warming up), its seconds include evaluating 64 test images. The teacher is an untrained one of the
preset's architecture: a step costs the same. One epoch of CIFAR-100 is 782 steps (50,000 images);
the recipe is 240 epochs."""

import argparse
import json
import time

import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from kdrun.configs import conf_dir
from kdrun.data.batches import DeviceData
from kdrun.loop import fit
from kdrun.models.build import build_model
from kdrun.objectives import OnlineTeacher
from kdrun.training import attach_objective

PAIRS = ["resnet56_resnet20", "resnet110_resnet32", "resnet32x4_resnet8x4", "wrn_40_2_wrn_16_2", "wrn_40_2_wrn_40_1",
         "vgg13_vgg8", "resnet32x4_shufflenetv2"]
STEPS_PER_EPOCH = 782  # ceil(50,000 / 64)


class _Rows:
    name = "bench"

    def __init__(self):
        self.rows = []

    def keep_epochs(self, n):
        pass

    def epoch_end(self, row):
        self.rows.append(row)


def kd_config(pair):
    from kdrun.commands import pipeline

    words = [f"experiment=cifar100_{pair}", "pipeline.only=[kd]"]
    plan = pipeline.plans(compose(config_name="pipeline", overrides=words), words)[0]
    name, command, jobs = plan.runs[0]
    return pipeline.compose_run(name, jobs[0], command)


def seconds_per_step(cfg, steps, device):
    torch.manual_seed(0)
    n, c = 64 * steps, cfg.dataset.num_classes
    images = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8)
    labels = torch.randint(0, c, (n,))
    mean, std = list(cfg.dataset.mean), list(cfg.dataset.std)
    train = DeviceData(images, labels, mean, std, device)
    test = DeviceData(images[:64], labels[:64], mean, std, device)
    student = build_model(cfg.student.model, c).to(device)
    teacher = build_model(cfg.teacher.model, c).to(device).eval()
    objective = instantiate(cfg.loss, teacher=OnlineTeacher(teacher))
    attach_objective(cfg.student.model, student, objective, (3, 32, 32), n)
    recipe = cfg.student.recipe
    optimizer = instantiate(recipe.optimizer)(student.parameters())
    scheduler = instantiate(recipe.scheduler)(optimizer, total_steps=2 * steps)
    rows = _Rows()
    fit(student, objective, train, test, optimizer, scheduler, epochs=2, batch_size=recipe.batch_size,
        jitter=recipe.jitter, flip=recipe.flip, generator=torch.Generator().manual_seed(0), recorder=rows,
        progress=False)
    return rows.rows[-1]["seconds"] / steps


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3, help="steps of each of the two epochs (the second is timed)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default="cifar_pairs.json")
    args = parser.parse_args()
    device = torch.device(args.device)
    out = []
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        for pair in PAIRS:
            cfg = kd_config(pair)
            started = time.perf_counter()
            step = seconds_per_step(cfg, args.steps, device)
            epoch = step * STEPS_PER_EPOCH
            out.append({"pair": pair, "kd_step_s": round(step, 3), "kd_epoch_s": round(epoch), "kd_run_h": round(epoch * 240 / 3600, 1),
                        "measured_in_s": round(time.perf_counter() - started, 1)})
            print(json.dumps(out[-1]), flush=True)
    with open(args.out, "w") as f:
        json.dump({"device": str(device), "threads": torch.get_num_threads(), "pairs": out}, f, indent=1)


if __name__ == "__main__":
    main()
