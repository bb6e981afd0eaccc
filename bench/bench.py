"""kdrun's benchmark: speed as ratios measured side by side in one run, on full Fashion-MNIST.

    python bench/bench.py [--out bench.json] [--epochs 2] [--repeats 3] [--device cpu|cuda]
    python bench/bench.py --suite cifar [...]     resnet32x4 -> resnet8x4 distillation (bench/cifar.py)

Prints a table and writes bench.json. Every kdrun number comes from the real CLI (`metrics.jsonl`'s
per-epoch seconds, the last epoch's, so warm-up is left out); the ceiling and the tutorial loop run in
this process. Every target ratio is the median over --repeats of a ratio measured side by side: each
training share against the GEMM ceiling measured just before and just after that training (the
machine's rate drifts by tens of percent over minutes here; bench.json has the range), each teacher
epoch against a tutorial epoch run right after it, the distillations in interleaved rounds.
Standard tools only: torch, torchvision, time."""

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

BATCH = 128
N_TRAIN = 60_000
MLP1200 = [784, 1200, 1200, 10]
MLP800 = [784, 800, 800, 10]
TEST = ["dataset=fashion_mnist", "dataset.test_limit=100", "progress=false"]  # evaluation ~free
TEACHER = ["teacher=mlp1200"]


def gemm_flops(widths, n):
    """FLOPs of an MLP's three GEMMs per layer (forward, input gradient, weight gradient) for n examples."""
    return 6 * n * sum(a * b for a, b in zip(widths, widths[1:]))


def training_flops(widths, n):
    """FLOPs a training step really computes: every GEMM but the first layer's input gradient (the
    images need none, and autograd skips it)."""
    return gemm_flops(widths, n) - 2 * n * widths[0] * widths[1]


def achieved_gflops(widths, seconds):
    """GFLOP/s of an epoch of full Fashion-MNIST that took `seconds`."""
    return training_flops(widths, N_TRAIN) / seconds / 1e9


def cpu_name():
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").is_file() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def sync(device):
    """Wait for the device's queued work, so that a clock read after it measures the work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def gemm_operands(widths, n, device):
    """Random operands of each layer's training GEMMs at batch n: input, weight, output gradient."""
    return [(torch.randn(n, a, device=device), torch.randn(a, b, device=device), torch.randn(n, b, device=device))
            for a, b in zip(widths, widths[1:])]


def run_gemms(layers):
    """Each layer's forward X@W and backward dY@W^T and X^T@dY, back to back (gemm_flops of them)."""
    for x, w, dy in layers:
        x @ w
        dy @ w.T
        x.T @ dy


def matmul_ceiling(widths, device, reps=200):
    """GFLOP/s of exactly the MLP's training GEMMs at batch BATCH, back to back: the rate the machine
    gives these shapes."""
    layers = gemm_operands(widths, BATCH, device)
    for _ in range(10):
        run_gemms(layers)
    sync(device)
    started = time.perf_counter()
    for _ in range(reps):
        run_gemms(layers)
    sync(device)
    return gemm_flops(widths, BATCH) * reps / (time.perf_counter() - started) / 1e9


def kdrun(env, *args):
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "kdrun", *args], env=env, check=True, capture_output=True)
    return time.perf_counter() - started


def last_run(workdir, command):
    return max((Path(workdir) / "runs" / command).iterdir(), key=lambda p: p.stat().st_mtime)


def train(env, workdir, words):
    """`kdrun train` in this workdir's store; its run dir."""
    kdrun({**env, "KDRUN_WORKDIR": workdir}, "train", *words)
    return last_run(workdir, "train")


def epoch_seconds(run_dir):
    rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return rows[-1]["seconds"]


def tutorial_epoch_seconds(data_dir, epochs, device):
    """The same mlp1200 (dropout, max-norm, SGD, batch 128) as a PyTorch tutorial writes it and trains
    it: torch.nn's modules, torchvision dataset, ToTensor, a DataLoader with workers. No jitter: that is
    in kdrun's favour."""
    from torch import nn
    from torchvision import datasets, transforms

    ds = datasets.FashionMNIST(data_dir, train=True, download=False, transform=transforms.ToTensor())
    loader = torch.utils.data.DataLoader(ds, batch_size=BATCH, shuffle=True, num_workers=2)
    model = nn.Sequential(nn.Flatten(), nn.Dropout(0.2), nn.Linear(784, 1200), nn.ReLU(), nn.Dropout(0.5),
                          nn.Linear(1200, 1200), nn.ReLU(), nn.Dropout(0.5), nn.Linear(1200, 10)).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True)
    seconds = []
    for _ in range(epochs):
        started = time.perf_counter()
        model.train()
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            loss = torch.nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            with torch.no_grad():  # max-norm on each unit's incoming weights
                for layer in model:
                    if isinstance(layer, nn.Linear):
                        layer.weight.copy_(torch.renorm(layer.weight, 2, 0, 3.873))
        sync(device)
        seconds.append(time.perf_counter() - started)
    return seconds[-1]


def inference(model_path, batch, reps, device):
    from kdrun.models.build import build_model, with_input_shape

    payload = torch.load(model_path, weights_only=True)
    model = build_model(with_input_shape(payload["arch"], (1, 28, 28)), 10)
    model.load_state_dict(payload["model"])
    model.to(device).eval()
    x = torch.randn(batch, 1, 28, 28, device=device)
    times = []
    with torch.no_grad():
        for _ in range(reps + 5):
            started = time.perf_counter()
            model(x)
            sync(device)
            times.append(time.perf_counter() - started)
    return statistics.median(times[5:]), sum(p.numel() for p in model.parameters())


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench.json")
    parser.add_argument("--epochs", type=int, default=2, help="epochs of each timed training (the last is timed)")
    parser.add_argument("--repeats", type=int, default=3, help="repeats of every side-by-side ratio (the median is reported)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where everything is timed")
    parser.add_argument("--suite", default="default", choices=["default", "cifar"],
                        help="default: the Fashion-MNIST MLPs above; cifar: resnet32x4 -> resnet8x4 (bench/cifar.py)")
    cifar_options = parser.add_argument_group("--suite cifar")
    cifar_options.add_argument("--limit", type=int, default=1024, help="training images")
    cifar_options.add_argument("--data-dir", type=Path, help="a data_dir holding cifar-10-batches-py (default: random "
                               "images written in that layout)")
    cifar_options.add_argument("--imagefolder", type=Path, help="a root/train/<class>/*.jpg tree instead")
    cifar_options.add_argument("--variants", default="fp32,bf16,channels_last,bf16_channels_last,compile",
                               help="kdrun settings to time (bench/cifar.py VARIANTS)")
    cifar_options.add_argument("--workers", type=int, default=2, help="the tutorial DataLoader's workers")
    cifar_options.add_argument("--teacher", default="resnet32x4", help="a CIFAR zoo model (kdrun.models.zoo.ZOO)")
    cifar_options.add_argument("--student", default="resnet8x4", help="a CIFAR zoo model (kdrun.models.zoo.ZOO)")
    args = parser.parse_args()
    if args.suite == "cifar":
        return cifar_suite(args)
    device = torch.device(args.device)
    data_dir = os.environ.get("KDRUN_DATA", "data")
    workdir = tempfile.mkdtemp(prefix="kdrun-bench-")
    env = {**os.environ, "KDRUN_WORKDIR": workdir, "KDRUN_DATA": data_dir}
    r = {"threads": torch.get_num_threads(), "epochs": args.epochs, "repeats": args.repeats, "device": args.device,
         "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()}

    r["help_startup_s"] = statistics.median(kdrun(env, "distill", "--help") for _ in range(3))
    ceilings = {"matmul_gflops": [], "matmul_gflops_mlp800": []}  # every measurement, for the range

    def ceiling(key, widths):
        ceilings[key].append(matmul_ceiling(widths, device))
        return ceilings[key][-1]

    def around(key, widths, timed):
        """timed() and the ceiling measured just before and just after it (the machine's rate drifts by
        tens of percent over minutes here, so a share is only fair against the rate of its own minute)."""
        before = ceiling(key, widths)
        seconds = timed()
        return seconds, (before + ceiling(key, widths)) / 2

    quick = [*TEACHER, *TEST, f"device={args.device}", f"teacher.recipe.epochs={args.epochs}"]  # every command finds this one teacher
    teacher_seconds, teacher_shares, tutorial_speedups, bf16_speedups = [], [], [], []
    for rep in range(args.repeats):  # the teacher, its ceiling, the tutorial loop and bf16 side by side, each repeat
        home = workdir if rep == 0 else str(Path(workdir, f"teacher-{rep}"))  # a fresh store: it trains again
        teacher_s, rate = around("matmul_gflops", MLP1200, lambda: epoch_seconds(train(env, home, quick)))
        teacher_seconds.append(teacher_s)
        teacher_shares.append(achieved_gflops(MLP1200, teacher_s) / rate)
        tutorial_speedups.append(tutorial_epoch_seconds(data_dir, args.epochs, device) / teacher_s)
        # autocast: bfloat16 GEMMs where the CPU has them (avx512_bf16)
        bf16_speedups.append(teacher_s / epoch_seconds(train(env, home, [*quick, "precision=bf16"])))
    r["kdrun_teacher_epoch_s"] = statistics.median(teacher_seconds)
    r["teacher_bf16_speedup"] = statistics.median(bf16_speedups)
    base = [*quick, f"epochs={args.epochs}"]
    jitter = [*base, "student.recipe.jitter=2"]  # the online teacher runs on the student's jittered batch
    runs = {"alone": [*base, "alpha=0"], "cached": [*base, "T=4"],
            "alone_jitter": [*jitter, "alpha=0"], "online": [*jitter, "T=4", "transfer.augment=true"]}
    seconds, student_shares = {name: [] for name in runs}, []

    def distill(words):
        kdrun(env, "distill", *words)
        return epoch_seconds(last_run(workdir, "distill"))

    for _ in range(args.repeats):  # interleaved, so that the machine's drift hits each alike
        for name, words in runs.items():
            if name == "alone":  # the student's share, against the ceiling around it
                alone_s, rate = around("matmul_gflops_mlp800", MLP800, lambda: distill(words))
                student_shares.append(achieved_gflops(MLP800, alone_s) / rate)
                seconds[name].append(alone_s)
            else:
                seconds[name].append(distill(words))
            if name == "cached":
                cached_run = last_run(workdir, "distill")
    for key, rates in ceilings.items():
        r[key] = statistics.median(rates)
        r[f"{key}_range"] = f"{min(rates):.1f}-{max(rates):.1f}"
    r["distill_cached_over_alone"] = statistics.median(c / a for c, a in zip(seconds["cached"], seconds["alone"]))
    r["distill_online_over_alone"] = statistics.median(o / a for o, a in zip(seconds["online"], seconds["alone_jitter"]))
    r["teacher_frac_of_peak"] = statistics.median(teacher_shares)
    r["teacher_frac_of_peak_each"] = [round(x, 3) for x in teacher_shares]
    r["student_frac_of_peak"] = statistics.median(student_shares)
    r["student_frac_of_peak_each"] = [round(x, 3) for x in student_shares]
    r["speedup_vs_tutorial"] = statistics.median(tutorial_speedups)
    r["speedup_vs_tutorial_each"] = [round(x, 3) for x in tutorial_speedups]
    alone_s = statistics.median(seconds["alone"])
    r["teacher_samples_per_s"] = N_TRAIN / r["kdrun_teacher_epoch_s"]
    r["teacher_gflops"] = achieved_gflops(MLP1200, r["kdrun_teacher_epoch_s"])
    r["student_samples_per_s"] = N_TRAIN / alone_s
    r["student_gflops"] = achieved_gflops(MLP800, alone_s)

    one = kdrun(env, "distill", *quick, "epochs=1", "alpha=0")
    sweep = kdrun(env, "distill", "-m", *quick, "epochs=1", "T=1,2,5,10,20")
    fused = kdrun(env, "distill", *quick, "epochs=1", "sweep.fused=true", "T=[1,2,5,10,20]")
    r["sweep5_over_5x_alone"] = sweep / (5 * one)
    r["sweep5_fused_over_5x_alone"] = fused / (5 * one)
    r["sweep5_fused_over_sweep5"] = fused / sweep

    teacher_path = next(Path(workdir, "teachers").glob("*/model.pt"))
    teacher_b1, r["teacher_params"] = inference(teacher_path, 1, 300, device)
    student_b1, r["student_params"] = inference(cached_run / "model.pt", 1, 300, device)
    teacher_big, _ = inference(teacher_path, 1024, 30, device)
    student_big, _ = inference(cached_run / "model.pt", 1024, 30, device)
    r["student_latency_speedup_b1"] = teacher_b1 / student_b1
    r["student_throughput_speedup_b1024"] = teacher_big / student_big
    r["teacher_latency_b1_ms"], r["student_latency_b1_ms"] = teacher_b1 * 1e3, student_b1 * 1e3

    Path(args.out).write_text(json.dumps(r, indent=2, sort_keys=True) + "\n")
    width = max(map(len, r))
    for k, v in r.items():
        print(f"{k.ljust(width)}  {v:.3f}" if isinstance(v, float) and not math.isnan(v) else f"{k.ljust(width)}  {v}")


def cifar_suite(args):
    sys.path.insert(0, str(Path(__file__).parent))
    import cifar

    r = cifar.run(args, cpu_name)
    out = Path(args.out if args.out != "bench.json" else "bench_cifar.json")
    out.write_text(json.dumps(r, indent=2) + "\n")
    print(cifar.table(r))


if __name__ == "__main__":
    main()
