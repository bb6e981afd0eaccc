import gzip
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch

FASHION_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
KDRUN = [sys.executable, "-m", "kdrun"]
# A small, quick Fashion-MNIST subset for end-to-end runs (stratified, so every class is there).
QUICK = ["dataset=fashion_mnist", "dataset.limit=1000", "dataset.test_limit=500", "progress=false"]


def write_idx(path, array):
    """Write a uint8 tensor as an IDX file (the MNIST format)."""
    array = torch.as_tensor(array, dtype=torch.uint8)
    header = bytes([0, 0, 0x08, array.dim()]) + struct.pack(f">{array.dim()}I", *array.shape)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_bytes(header + array.numpy().tobytes())


def write_mnist_like(raw_dir, n_train=300, n_test=100, seed=0):
    """IDX files shaped like MNIST whose class is drawn as a bright bar, so a model can learn it."""
    g = torch.Generator().manual_seed(seed)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = torch.arange(n) % 10
        images = (torch.rand(n, 28, 28, generator=g) * 60).to(torch.uint8)
        for i, c in enumerate(labels.tolist()):
            images[i, 2 + 2 * c : 4 + 2 * c, 4:24] = 250
        write_idx(Path(raw_dir) / f"{prefix}-images-idx3-ubyte", images)
        write_idx(Path(raw_dir) / f"{prefix}-labels-idx1-ubyte", labels)


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    """A data_dir holding Fashion-MNIST, unpacked once from Debian's package (`make test` installs it)."""
    if not FASHION_SYSTEM_DIR.is_dir():
        pytest.fail(f"{FASHION_SYSTEM_DIR} is missing: run `make test` (installs dataset-fashion-mnist) "
                    "or `apt-get install dataset-fashion-mnist`")
    root = tmp_path_factory.mktemp("data")
    raw = root / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for gz in FASHION_SYSTEM_DIR.glob("*.gz"):
        with gzip.open(gz, "rb") as fin, open(raw / gz.stem, "wb") as fout:
            shutil.copyfileobj(fin, fout)
    return root


@pytest.fixture
def env(tmp_path, data_dir):
    """Environment for a kdrun subprocess with its own workdir."""
    e = dict(os.environ)
    e.update(KDRUN_WORKDIR=str(tmp_path / "work"), KDRUN_DATA=str(data_dir), PYTHONUNBUFFERED="1")
    e.pop("KDRUN_DEBUG", None)
    e.pop("HYDRA_FULL_ERROR", None)
    return e


@pytest.fixture
def kdrun(env, tmp_path):
    """Run the real CLI in a subprocess; returns the CompletedProcess."""

    def run(*args, check=True, extra_env=None):
        proc = subprocess.run([*KDRUN, *args], env={**env, **(extra_env or {})}, cwd=tmp_path,
                              capture_output=True, text=True, timeout=600)
        if check and proc.returncode != 0:
            raise AssertionError(f"kdrun {' '.join(args)} exited {proc.returncode}:\n{proc.stderr[-3000:]}")
        return proc

    return run


@pytest.fixture
def workdir(env):
    return Path(env["KDRUN_WORKDIR"])


CIFAR_CLASSES = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse", b"ship", b"truck"]


def write_cifar_like(batches_dir, n_per_batch=20, seed=0):
    """torchvision's cifar-10-batches-py: data_batch_1..5, test_batch and batches.meta, each a protocol-2
    pickle of a dict with bytes keys, `data` a uint8 [n, 3072] array of random pixels (channel-major 3x32x32).
    Returns {file name: (data, labels)}."""
    import pickle

    import numpy as np

    rng = np.random.default_rng(seed)
    batches_dir = Path(batches_dir)
    batches_dir.mkdir(parents=True, exist_ok=True)
    written = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, (n_per_batch, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, n_per_batch)]
        batch = {b"batch_label": name.encode(), b"labels": labels, b"data": data,
                 b"filenames": [f"img_{i}.png".encode() for i in range(n_per_batch)]}
        (batches_dir / name).write_bytes(pickle.dumps(batch, protocol=2))
        written[name] = (data, labels)
    meta = {b"num_cases_per_batch": n_per_batch, b"label_names": CIFAR_CLASSES, b"num_vis": 3072}
    (batches_dir / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))
    return written


@pytest.fixture
def cifar_dir(tmp_path):
    """A data_dir holding a tiny CIFAR-10 (20 random images per batch file) in torchvision's layout."""
    root = tmp_path / "cifar_data"
    write_cifar_like(root / "cifar-10-batches-py")
    return root
