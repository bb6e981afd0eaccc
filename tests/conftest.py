import contextlib
import gzip
import io
import logging
import os
import shutil
import struct
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

if os.environ.get("PYTEST_XDIST_WORKER"):  # `make test` runs one worker per core (pytest -n): one thread each,
    os.environ["OMP_NUM_THREADS"] = "1"     # here and in the CLI processes the tests start, since threads
    torch.set_num_threads(1)                 # fighting over a core make these small models several times slower

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


@pytest.fixture
def float64():
    """Float64 by default for the test: loss limits and identities are checked to tight tolerances."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


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


# ---------------------------------------------------------------- the CLI in this process

class _ToBuffer(logging.Handler):
    """What a fresh process has before Hydra configures logging (logging.lastResort): warnings and
    errors on stderr, written to whatever sys.stderr is when the record comes."""

    def __init__(self):
        super().__init__(logging.WARNING)

    def emit(self, record):
        sys.stderr.write(self.format(record) + "\n")


# Python's own warning filters (those of a process started without -W), so a warning the CLI would
# print in its own process reaches the captured stderr here too, where it was emitted
PYTHON_WARNING_FILTERS = [("default", DeprecationWarning, "__main__"), ("ignore", DeprecationWarning, None),
                          ("ignore", PendingDeprecationWarning, None), ("ignore", ImportWarning, None),
                          ("ignore", ResourceWarning, None)]


def kdrun_in_process(args, env=None, cwd=None):
    """`kdrun ARGS` as `kdrun.cli.main(ARGS)` in this process, with the environment `env` (the whole
    environment, as a subprocess gets it) and the working directory `cwd`; returns a CompletedProcess
    (returncode, stdout, stderr) like subprocess.run. What a process would start afresh is restored
    around the call: os.environ, the cwd, Hydra's global state, the root logger's handlers and the
    warning filters. It saves starting Python, torch and Hydra (seconds a call) and reuses the data
    already read; use the `kdrun` fixture where a separate process is the point."""
    from hydra.core.global_hydra import GlobalHydra

    from kdrun import cli

    args = [str(a) for a in args]
    saved_env, saved_cwd = dict(os.environ), os.getcwd()
    root = logging.getLogger()
    saved_handlers, saved_level = root.handlers[:], root.level
    out, err = io.StringIO(), io.StringIO()
    code = 0
    try:
        if env is not None:
            os.environ.clear()
            os.environ.update(env)
        if cwd is not None:
            os.chdir(cwd)
        GlobalHydra.instance().clear()
        root.handlers = [_ToBuffer()]
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), warnings.catch_warnings():
            warnings.resetwarnings()
            for action, category, module in reversed(PYTHON_WARNING_FILTERS):
                warnings.filterwarnings(action, category=category, module=module or "")
            warnings.showwarning = lambda message, category, filename, lineno, file=None, line=None: sys.stderr.write(
                warnings.formatwarning(message, category, filename, lineno, line))
            try:
                cli.main(args)
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        for handler in root.handlers:  # Hydra's console and file handlers of the run
            if handler not in saved_handlers:
                handler.close()
        root.handlers = saved_handlers
        root.setLevel(saved_level)
        GlobalHydra.instance().clear()
        os.chdir(saved_cwd)
        os.environ.clear()
        os.environ.update(saved_env)
    return subprocess.CompletedProcess(["kdrun", *args], code, out.getvalue(), err.getvalue())


@pytest.fixture
def kdrun_here(env, tmp_path):
    """The `kdrun` fixture's run(), in this process (kdrun_in_process): same arguments, same result."""

    def run(*args, check=True, extra_env=None):
        proc = kdrun_in_process(args, env={**env, **(extra_env or {})}, cwd=tmp_path)
        if check and proc.returncode != 0:
            raise AssertionError(f"kdrun {' '.join(args)} exited {proc.returncode}:\n{proc.stderr[-3000:]}")
        return proc

    return run


def trained_teacher(tmp_path_factory, data_dir, args):
    """A workdir whose store holds the teacher `kdrun train ARGS` trains (in process)."""
    work = tmp_path_factory.mktemp("teacher")
    env = {**os.environ, "KDRUN_WORKDIR": str(work / "work"), "KDRUN_DATA": str(data_dir)}
    env.pop("KDRUN_DEBUG", None)
    proc = kdrun_in_process(["train", *args], env=env, cwd=work)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return work / "work" / "teachers"


@pytest.fixture(scope="session")
def mlp30_teachers(tmp_path_factory, data_dir):
    """The store of one trained teacher, `kdrun train teacher=mlp30 teacher.recipe.epochs=1` on QUICK,
    trained once for the session: copy it into a test's workdir (`use_teachers`) instead of training."""
    return trained_teacher(tmp_path_factory, data_dir, ["teacher=mlp30", "teacher.recipe.epochs=1", *QUICK])


# the feature methods' teacher (stages to read) on the subset the feature and CRD tests train on
FEATURE_SUBSET = ["dataset=fashion_mnist", "dataset.limit=300", "dataset.test_limit=100", "progress=false"]
CNN_TEACHER = ["teacher=cnn", "teacher.recipe.epochs=1"]


@pytest.fixture(scope="session")
def cnn_teachers(tmp_path_factory, data_dir):
    """The store of `kdrun train teacher=cnn teacher.recipe.epochs=1` on FEATURE_SUBSET, trained once for
    the session: copy it into a test's workdir (`use_teachers`)."""
    return trained_teacher(tmp_path_factory, data_dir, [*CNN_TEACHER, *FEATURE_SUBSET])


def use_teachers(store, workdir):
    """Copy a trained teacher store (a session fixture's) into `workdir`/teachers."""
    shutil.copytree(store, Path(workdir) / "teachers", dirs_exist_ok=True)


# ---------------------------------------------------------------- tiers

SUBPROCESS_FIXTURES = {"kdrun", "env"}  # a test that asks for these starts the CLI in its own process


def pytest_collection_modifyitems(items):
    """A test that runs the CLI in a subprocess (it asks for the `kdrun` or `env` fixture) is an
    end-to-end test: marked slow, so `make test-fast` (-m "not slow") leaves it out. Mark slow by hand
    what else trains or starts processes (docs/testing.md)."""
    for item in items:
        if SUBPROCESS_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(autouse=True)
def _no_logging_handlers_left_behind():
    """A Hydra app run in a test's process (`--help`, a run) leaves its handlers on the root logger,
    bound to that test's captured stdout/stderr, which are closed once it ends: the next test that
    logs would print a logging error. Remove what a test added (pytest's own handlers excepted)."""
    root = logging.getLogger()
    before, level = root.handlers[:], root.level
    yield
    for handler in root.handlers[:]:
        if handler not in before and not type(handler).__module__.startswith("_pytest"):
            root.removeHandler(handler)
            handler.close()
    root.setLevel(level)
