"""The CIFAR suite: an epoch of resnet32x4 -> resnet8x4 distillation with the teacher run online on
the student's augmented view (4-pixel padded random crops and flips), in kdrun and in a tutorial's loop.

    python bench/bench.py --suite cifar [--limit 1024] [--epochs 2] [--repeats 3] [--device cpu|cuda]
                                        [--data-dir DIR | --imagefolder ROOT] [--variants fp32,bf16,...]

kdrun's numbers come from the real CLI (`kdrun distill ... transfer.augment=true`, the last epoch's
`seconds` in metrics.jsonl); the tutorial loop runs in this process: torchvision's CIFAR10 (or
ImageFolder) over the same files, RandomCrop(32, padding=4), RandomHorizontalFlip, ToTensor,
Normalize, a DataLoader with workers, the same kdrun zoo models in fp32, SGD (momentum 0.9, lr 0.05,
weight decay 5e-4), batch 64, the teacher's forward every step under no_grad. Each repeat is one
round, side by side: the tutorial epoch, then each kdrun setting's distillation and its student alone
(alpha=0, the same augmentation); every ratio is the median over the repeats of the ratio within a
round. By default the data are random images written in torchvision's CIFAR-10 layout."""

import json
import math
import os
import pickle
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torchvision import datasets, transforms

BATCH, LR, MOMENTUM, WEIGHT_DECAY = 64, 0.05, 0.9, 5e-4
T, ALPHA = 4.0, 0.9
MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)  # conf/dataset/cifar10.yaml
N_TEST = 20  # kdrun evaluates after each epoch, inside its timed seconds: two images a class keep that ~free
# kdrun's settings, as overrides of `kdrun distill`; fp32 is kdrun's default
VARIANTS = {
    "fp32": [],
    "bf16": ["precision=bf16"],
    "channels_last": ["channels_last=true"],
    "bf16_channels_last": ["precision=bf16", "channels_last=true"],
    "compile": ["compile=true"],
}
TARGETS = {"cuda": {"speedup_vs_tutorial": 3.0, "kd_over_alone": 1.2}, "cpu": {"speedup_vs_tutorial": 1.3}}


class _Python2Pickler(pickle._Pickler):
    """Writes bytes and str with Python 2's string opcodes, as cPickle wrote the real CIFAR-10 files: they
    load as str under torchvision's encoding="latin1" and as bytes under kdrun's encoding="bytes"."""

    def save_bytes(self, obj):
        if len(obj) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(obj)]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(obj)) + obj)
        self.memoize(obj)

    def save_str(self, obj):
        self.save_bytes(obj.encode("latin1"))

    dispatch = {**pickle._Pickler.dispatch, bytes: save_bytes, str: save_str}


def write_random_cifar(data_dir, n_train, n_test=N_TEST, seed=0):
    """data_dir/cifar-10-batches-py in torchvision's layout (data_batch_1..5, test_batch, batches.meta) of
    random images: n_train spread over the five batch files, every class equally often (so that a
    stratified limit of any size is possible). Returns the batches folder."""
    rng = np.random.default_rng(seed)
    folder = Path(data_dir) / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    parts = np.array_split(rng.permutation(np.arange(n_train) % 10), 5) + [rng.permutation(np.arange(n_test) % 10)]
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name, part in zip(names, parts):
        labels, n = [int(v) for v in part], len(part)
        batch = {"batch_label": name, "labels": labels, "data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                 "filenames": [f"{name}_{i}.png" for i in range(n)]}
        _dump(folder / name, batch)
    classes = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    _dump(folder / "batches.meta", {"num_cases_per_batch": len(parts[0]), "label_names": classes, "num_vis": 3072})
    return folder


def _dump(path, obj):
    with open(path, "wb") as f:
        _Python2Pickler(f, protocol=2).dump(obj)


def median_ratio(numerators, denominators):
    """The median of the ratios of paired measurements (each pair from one round)."""
    return statistics.median(a / b for a, b in zip(numerators, denominators, strict=True))


def summarise(seconds, n_train, variants):
    """Every figure of the suite from the rounds' epoch seconds: seconds["tutorial"], seconds["kd_<v>"] and
    seconds["alone_<v>"] (one entry a round) for each variant v. Speed-ups are tutorial / kdrun; kd_over_alone
    is distillation / the student alone in the same setting; the best setting is the fastest distillation."""
    r = {"tutorial_kd_epoch_s": statistics.median(seconds["tutorial"])}
    r["tutorial_kd_images_per_s"] = n_train / r["tutorial_kd_epoch_s"]
    for v in variants:
        kd, alone = seconds[f"kd_{v}"], seconds[f"alone_{v}"]
        r[f"kd_epoch_s_{v}"], r[f"alone_epoch_s_{v}"] = statistics.median(kd), statistics.median(alone)
        r[f"kd_images_per_s_{v}"] = n_train / r[f"kd_epoch_s_{v}"]
        r[f"alone_images_per_s_{v}"] = n_train / r[f"alone_epoch_s_{v}"]
        r[f"speedup_vs_tutorial_{v}"] = median_ratio(seconds["tutorial"], kd)
        r[f"speedup_vs_tutorial_{v}_each"] = [round(t / k, 3) for t, k in zip(seconds["tutorial"], kd)]
        r[f"kd_over_alone_{v}"] = median_ratio(kd, alone)
        r[f"kd_over_alone_{v}_each"] = [round(k / a, 3) for k, a in zip(kd, alone)]
        if v != variants[0]:
            r[f"speedup_vs_{variants[0]}_{v}"] = median_ratio(seconds[f"kd_{variants[0]}"], kd)
    best = min(variants, key=lambda v: r[f"kd_epoch_s_{v}"])
    r["best_variant"] = best
    for key in ("kd_epoch_s", "kd_images_per_s", "speedup_vs_tutorial", "kd_over_alone"):
        r[f"best_{key}"] = r[f"{key}_{best}"]
    return r


def epoch_seconds(run_dir):
    rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return rows[-1]["seconds"]


def kdrun(env, command, words):
    """`kdrun COMMAND WORDS...` in the store env["KDRUN_WORKDIR"]; the run dir it made."""
    done = subprocess.run([sys.executable, "-m", "kdrun", command, *words], env=env, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"kdrun {command} {' '.join(words)} failed:\n{done.stderr[-3000:]}")
    runs = Path(env["KDRUN_WORKDIR"]) / "runs" / command
    return max(runs.iterdir(), key=lambda p: p.stat().st_mtime)


def build(name, num_classes=10):
    """The kdrun zoo model conf/model/<name>.yaml builds, as a plain torch.nn module."""
    from kdrun.models.zoo import ZOO

    builder, kwargs = ZOO[name]
    return builder(num_classes, **kwargs)


def tutorial_dataset(data_dir, imagefolder, n_train):
    """The training split as a tutorial loads it, with the crop+flip recipe, cut to n_train images (a
    fixed random choice: the timing does not depend on which)."""
    augment = transforms.Compose([transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip(),
                                  transforms.ToTensor(), transforms.Normalize(MEAN, STD)])
    if imagefolder:
        full = datasets.ImageFolder(str(Path(imagefolder) / "train"), transform=augment)
    else:
        full = UnverifiedCIFAR10(data_dir, train=True, download=False, transform=augment)
    rows = torch.randperm(len(full), generator=torch.Generator().manual_seed(0))[:n_train].tolist()
    return torch.utils.data.Subset(full, rows)


class UnverifiedCIFAR10(datasets.CIFAR10):
    """torchvision's CIFAR10 without its md5 checks (the sums are those of the real files, and the suite's
    own files are random images); the images are read by torchvision's own code."""

    def _check_integrity(self):
        return True

    def _load_meta(self):
        with open(Path(self.root) / self.base_folder / self.meta["filename"], "rb") as f:
            self.classes = pickle.load(f, encoding="latin1")[self.meta["key"]]
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}


def tutorial_kd_seconds(dataset, teacher, student, epochs, device, workers):
    """The last of `epochs` epochs of KD written the way a tutorial writes it. Returns seconds."""
    import torch.nn.functional as F

    loader = torch.utils.data.DataLoader(dataset, batch_size=BATCH, shuffle=True, num_workers=workers,
                                         pin_memory=device.type == "cuda")
    teacher, student = teacher.to(device).eval(), student.to(device)
    optimizer = torch.optim.SGD(student.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
    seconds = []
    for _ in range(epochs):
        started = time.perf_counter()
        student.train()
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            with torch.no_grad():
                teacher_logits = teacher(x)
            logits = student(x)
            soft = F.kl_div(F.log_softmax(logits / T, 1), F.softmax(teacher_logits / T, 1), reduction="batchmean")
            loss = ALPHA * T * T * soft + (1 - ALPHA) * F.cross_entropy(logits, y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds.append(time.perf_counter() - started)
    return seconds[-1]


def data_words(data_dir, imagefolder, n_train):
    if imagefolder:
        data = ["dataset=imagefolder", f"dataset.root={Path(imagefolder).resolve()}", "dataset.num_classes=10"]
    else:
        data = ["dataset=cifar10", f"data_dir={Path(data_dir).resolve()}"]
    return [*data, f"dataset.limit={n_train}", f"dataset.test_limit={N_TEST}", "progress=false"]


def run(args, cpu_name):
    """The suite's figures (a dict) for the parsed arguments of bench.py (cpu_name: bench.py's)."""
    device = torch.device(args.device)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    from kdrun.models.zoo import ZOO

    unknown = [v for v in variants if v not in VARIANTS]
    if args.teacher not in ZOO or args.student not in ZOO:
        raise SystemExit(f"--teacher and --student: models of the CIFAR zoo ({', '.join(ZOO)})")
    if unknown or not variants:
        raise SystemExit(f"--variants: unknown {unknown}; choose from {', '.join(VARIANTS)}")
    workdir = tempfile.mkdtemp(prefix="kdrun-bench-cifar-")
    data_dir = args.data_dir
    if data_dir is None and not args.imagefolder:
        data_dir = Path(workdir) / "data"
        write_random_cifar(data_dir, args.limit)
    env = {**os.environ, "KDRUN_WORKDIR": workdir}
    data = data_words(data_dir, args.imagefolder, args.limit)
    models = [f"device={args.device}", f"teacher={args.teacher}", f"student={args.student}"]
    # the teacher: timing needs its architecture, not its accuracy (one epoch on at most two batches)
    trained = kdrun(env, "train", [*data_words(data_dir, args.imagefolder, min(args.limit, 2 * BATCH)), *models,
                                   "epochs=1"])
    teacher_pt = trained / "model.pt"
    distill = [*data, *models, f"teacher_ckpt={teacher_pt}", f"epochs={args.epochs}", f"T={T}"]
    payload = torch.load(teacher_pt, weights_only=True)
    dataset = tutorial_dataset(data_dir, args.imagefolder, args.limit)
    n_train = len(dataset)
    r = {"suite": "cifar", "teacher": args.teacher, "student": args.student, "device": args.device,
         "threads": torch.get_num_threads(), "epochs": args.epochs,
         "repeats": args.repeats, "n_train": n_train, "batch_size": BATCH, "tutorial_workers": args.workers,
         "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name(),
         "data": str(args.imagefolder or args.data_dir or "random images (CIFAR-10 pickles)"),
         "variants": variants, "targets": TARGETS[args.device]}
    seconds = {"tutorial": [], **{f"{kind}_{v}": [] for v in variants for kind in ("kd", "alone")}}
    for rep in range(args.repeats):  # one round each: the tutorial and every kdrun run side by side
        teacher = build(args.teacher)
        teacher.load_state_dict(payload["model"])
        seconds["tutorial"].append(tutorial_kd_seconds(dataset, teacher, build(args.student), args.epochs, device,
                                                       args.workers))
        for v in variants:
            seconds[f"kd_{v}"].append(epoch_seconds(kdrun(env, "distill", [*distill, *VARIANTS[v], f"alpha={ALPHA}",
                                                                          "transfer.augment=true"])))
            seconds[f"alone_{v}"].append(epoch_seconds(kdrun(env, "distill", [*distill, *VARIANTS[v], "alpha=0"])))
        print(f"round {rep + 1}/{args.repeats}: " + ", ".join(f"{k} {s[-1]:.2f}s" for k, s in seconds.items()),
              file=sys.stderr)
    r.update(summarise(seconds, n_train, variants))
    r["seconds_each"] = {k: [round(s, 3) for s in v] for k, v in seconds.items()}
    return r


def table(r):
    """The printed table: one row a setting."""
    lines = [f"CIFAR suite on {r['device_name']} ({r['device']}): {r['teacher']} -> {r['student']}, "
             f"{r['n_train']} images, batch {r['batch_size']}, epoch {r['epochs']} of {r['epochs']} timed, "
             f"median of {r['repeats']}",
             f"{'setting':<30}{'epoch s':>9}{'images/s':>10}{'vs tutorial':>13}{'KD / alone':>12}",
             f"{'tutorial KD (fp32)':<30}{r['tutorial_kd_epoch_s']:>9.2f}{r['tutorial_kd_images_per_s']:>10.1f}"
             f"{'1.00x':>13}{'':>12}"]
    for v in r["variants"]:
        lines.append(f"{'kdrun KD ' + v:<30}{r[f'kd_epoch_s_{v}']:>9.2f}{r[f'kd_images_per_s_{v}']:>10.1f}"
                     f"{r[f'speedup_vs_tutorial_{v}']:>12.2f}x{r[f'kd_over_alone_{v}']:>11.2f}x")
    targets = ", ".join(f"{k} {'>=' if k.startswith('speedup') else '<='} {v}" for k, v in r["targets"].items())
    lines.append(f"best: {r['best_variant']} ({r['best_speedup_vs_tutorial']:.2f}x the tutorial, "
                 f"{r['best_kd_over_alone']:.2f}x its student alone); targets on {r['device']}: {targets}")
    return "\n".join(lines)


def finite_positive(r):
    """The numeric figures of a result that are not finite and positive (empty when all are)."""
    bad = []
    for k, v in r.items():
        values = v if isinstance(v, list) else [v]
        for x in values:
            if isinstance(x, (int, float)) and not isinstance(x, bool) and not (math.isfinite(x) and x > 0):
                bad.append(k)
    return bad
