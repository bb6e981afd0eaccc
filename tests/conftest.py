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
