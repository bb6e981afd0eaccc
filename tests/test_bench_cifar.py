"""The CIFAR bench suite (bench/cifar.py): its data files read alike by kdrun and torchvision, its
ratios by hand, and a CI-sized run of the whole suite."""

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

BENCH = Path(__file__).parents[1] / "bench"
sys.path.insert(0, str(BENCH))
import cifar  # noqa: E402  (bench/ is not a package)


def test_random_cifar_files_read_alike_by_kdrun_and_torchvision(tmp_path):
    from kdrun.data.cifar import read_batches

    folder = cifar.write_random_cifar(tmp_path, n_train=37, n_test=10)
    images, labels = read_batches(*[folder / f"data_batch_{i}" for i in range(1, 6)])
    tutorial = cifar.UnverifiedCIFAR10(tmp_path, train=True)
    assert images.shape == (37, 3, 32, 32) and len(tutorial) == 37
    for k in (0, 20, 36):
        pixels, label = tutorial[k]
        assert np.array_equal(np.asarray(pixels), images[k].permute(1, 2, 0).numpy()) and label == labels[k]
    assert torch.bincount(labels).tolist() == [4] * 7 + [3] * 3  # every class as often as 37 allows
    assert tutorial.classes[0] == "airplane" and len(cifar.UnverifiedCIFAR10(tmp_path, train=False)) == 10


def test_summarise_takes_the_median_of_each_rounds_ratio():
    seconds = {"tutorial": [10.0, 30.0, 12.0], "kd_fp32": [5.0, 10.0, 3.0], "alone_fp32": [4.0, 5.0, 2.0],
               "kd_bf16": [2.0, 6.0, 4.0], "alone_bf16": [1.0, 4.0, 4.0]}
    r = cifar.summarise(seconds, 640, ["fp32", "bf16"])
    assert r["speedup_vs_tutorial_fp32"] == 3.0  # rounds: 2, 3, 4 (not 17.3 / 5 from the medians)
    assert r["speedup_vs_tutorial_fp32_each"] == [2.0, 3.0, 4.0]
    assert r["kd_over_alone_fp32"] == 1.5  # 1.25, 2, 1.5
    assert r["speedup_vs_fp32_bf16"] == pytest.approx(5 / 3)  # 2.5, 1.667, 0.75
    assert r["kd_epoch_s_fp32"] == 5.0 and r["kd_images_per_s_fp32"] == 128.0
    assert r["tutorial_kd_images_per_s"] == 640 / 12.0
    assert r["best_variant"] == "bf16" and r["best_kd_over_alone"] == 1.5  # 2, 1.5, 1
    assert r["best_speedup_vs_tutorial"] == r["speedup_vs_tutorial_bf16"] == 5.0  # 5, 5, 3
    assert cifar.finite_positive(r) == []
    assert cifar.finite_positive({"a": 1.0, "b": [2.0, float("nan")], "c": 0, "d": "x"}) == ["b", "c"]


@pytest.mark.slow
def test_the_suite_runs_at_ci_size_and_reports_every_figure(tmp_path):
    out = tmp_path / "bench_cifar.json"
    proc = subprocess.run([sys.executable, str(BENCH / "bench.py"), "--suite", "cifar", "--limit", "128",
                           "--epochs", "1", "--repeats", "1", "--teacher", "resnet8", "--student", "resnet8",
                           "--variants", "fp32,channels_last", "--workers", "1", "--out", str(out)],
                          capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(out.read_text())
    for v in ("fp32", "channels_last"):
        for key in ("kd_epoch_s", "alone_epoch_s", "kd_images_per_s", "alone_images_per_s", "speedup_vs_tutorial",
                    "kd_over_alone"):
            assert math.isfinite(r[f"{key}_{v}"]) and r[f"{key}_{v}"] > 0, key
    for key in ("tutorial_kd_epoch_s", "tutorial_kd_images_per_s", "best_speedup_vs_tutorial", "best_kd_over_alone",
                "speedup_vs_fp32_channels_last"):
        assert math.isfinite(r[key]) and r[key] > 0, key
    assert r["n_train"] == 128 and r["best_variant"] in ("fp32", "channels_last") and r["teacher"] == "resnet8"
    assert cifar.finite_positive(r) == []
    assert "kdrun KD fp32" in proc.stdout and "tutorial KD (fp32)" in proc.stdout


@pytest.mark.slow
def test_the_suite_reads_an_image_folder_in_both_loops(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", 64), ("test", 20)):
        for i in range(n):
            folder = tmp_path / "images" / split / f"class{i % 10}"
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    out = tmp_path / "bench_cifar.json"
    proc = subprocess.run([sys.executable, str(BENCH / "bench.py"), "--suite", "cifar", "--imagefolder",
                           str(tmp_path / "images"), "--limit", "64", "--epochs", "1", "--repeats", "1", "--teacher",
                           "resnet8", "--student", "resnet8", "--variants", "fp32", "--workers", "1", "--out", str(out)],
                          capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["data"] == str(tmp_path / "images") and r["n_train"] == 64 and cifar.finite_positive(r) == []
