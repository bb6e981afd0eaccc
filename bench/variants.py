"""Time one epoch of kdrun's loop in-process under variants of one setting, interleaved, for the notes
in bench/NOTES.md (a change is tried here before it goes into kdrun).

    KDRUN_DATA=... python bench/variants.py --model mlp1200 --repeats 3

Each variant is a function that returns (model, optimizer); the ratio printed is each variant's median
epoch time over the first variant's."""

import argparse
import statistics
import time

import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from kdrun.cli import conf_dir
from kdrun.commands.common import build_model, load_data
from kdrun.loop import fit
from kdrun.objectives import CrossEntropy


class NullRecorder:
    name = "bench"

    def keep_epochs(self, n):
        pass

    def epoch_end(self, row):
        pass


def epoch_seconds(cfg, data, role, optimizer_kwargs):
    recipe = cfg[role].recipe
    torch.manual_seed(0)
    model = build_model(cfg[role].model, data.num_classes)
    optimizer = instantiate(recipe.optimizer, **optimizer_kwargs)(model.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    started = time.perf_counter()
    fit(model, CrossEntropy(), data.train, data.test, optimizer, scheduler, epochs=1, batch_size=recipe.batch_size,
        jitter=recipe.jitter, generator=torch.Generator().manual_seed(0), recorder=NullRecorder(), progress=False)
    return time.perf_counter() - started


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="mlp1200", help="a teacher or student config name")
    parser.add_argument("--role", default="teacher", choices=["teacher", "student"], help="whose recipe to use")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--profile", action="store_true", help="instead: torch.profiler's top ops of one epoch")
    args = parser.parse_args()
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        cfg = compose("train", overrides=[f"{args.role}={args.model}", "dataset=fashion_mnist", "dataset.test_limit=100",
                                          "device=cpu"])
    data = load_data(cfg, torch.device("cpu"))
    if args.profile:
        with torch.profiler.profile() as prof:
            epoch_seconds(cfg, data, args.role, {})
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
        return
    variants = {"for-loop": {"fused": False, "foreach": False}, "foreach": {"fused": False, "foreach": True},
                "fused": {"fused": True}}
    times = {name: [] for name in variants}
    for _ in range(args.repeats):
        for name, kwargs in variants.items():
            times[name].append(epoch_seconds(cfg, data, args.role, kwargs))
            print(f"{name}: {times[name][-1]:.2f} s", flush=True)
    base = statistics.median(times["for-loop"])
    for name, t in times.items():
        print(f"{args.model} {name}: median {statistics.median(t):.2f} s, {statistics.median(t) / base:.2f}x for-loop")


if __name__ == "__main__":
    main()
