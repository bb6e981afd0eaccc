"""A run killed with SIGKILL part-way (tests/fault_at.py, in a process of its own), then `kdrun resume`d,
must end exactly as the same run never stopped: model.pt, every part of the last checkpoint (the model,
the objective's parameters, buffers and extra state, the optimiser, the scheduler, the random streams)
bit for bit, and the same metrics rows but their wall-clock seconds."""

import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import torch

FAULT_AT = [sys.executable, str(Path(__file__).with_name("fault_at.py"))]
# the only values a resumed run may differ in: wall-clock times, and a checkpoint's checksum of its
# whole payload (those times included)
WALL_CLOCK = {"seconds", "elapsed", "content_sha256"}


def only_run(workdir, command="distill"):
    runs = list((Path(workdir) / "runs" / command).iterdir())
    assert len(runs) == 1, runs
    return runs[0]


def metrics(run_dir):
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def assert_same(a, b, where="checkpoint"):
    """a == b, tensors bit for bit (dtype and shape too), through nested dicts and lists; wall-clock
    keys left out."""
    if torch.is_tensor(a):
        assert torch.is_tensor(b) and a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(a, b), f"{where}: differs by up to {(a.double() - b.double()).abs().max().item()}"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() - WALL_CLOCK == b.keys() - WALL_CLOCK, where
        for k in a.keys() - WALL_CLOCK:
            assert_same(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def kill_and_resume(kdrun, env, cwd, workdir, args, step):
    """Run `kdrun ARGS` to the end and keep it as the reference; run it again, SIGKILLed after optimiser
    step STEP (after at least one epoch's checkpoint), and `kdrun resume` it. `kdrun` (a conftest
    fixture's run()) may call the CLI in this process: only the killed run needs a process of its own.
    Returns (the resumed run dir, the reference run dir)."""
    kdrun(*args)
    reference = Path(cwd) / "reference"
    shutil.move(str(only_run(workdir)), str(reference))
    proc = subprocess.run([*FAULT_AT, "step", str(step), *args], env=env, cwd=cwd, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    run = only_run(workdir)
    assert not (run / "model.pt").exists()
    done = len(metrics(run))
    assert 0 < done < len(metrics(reference)), f"killed after {done} epoch(s): nothing checkpointed, or the end"
    kdrun("resume", str(run))
    return run, reference


def assert_resumed_identically(run, reference):
    """The resumed `run` ended as `reference` did: model.pt, checkpoints/last.pt, metrics.jsonl."""
    for name in ("model.pt", "checkpoints/last.pt"):
        assert_same(torch.load(Path(run) / name, weights_only=True),
                    torch.load(Path(reference) / name, weights_only=True), name)
    assert_same(metrics(run), metrics(reference), "metrics.jsonl")
