"""Data-parallel training under torchrun: a 2-process gloo run trains the model one process would with
the same global batch (to float tolerance), and only rank 0 writes."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import KDRUN, write_mnist_like
from kdrun import distributed
from kdrun.data.batches import Batch

N_TRAIN = 300
# batch 41 does not divide 300 (7 x 41 + 13): every batch splits 21/20 over two ranks, the last 7/6
COMMON = ["dataset=mnist", "progress=false", "device=cpu", "student=mlp30", "epochs=2", "batch_size=41"]
TEACHER = ["teacher=mlp30", "teacher.recipe.epochs=1"]
RUNS = {"alone": ["alpha=0"], "distilled": [*TEACHER, "T=3", "alpha=0.7"]}
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone", "-m", "kdrun"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """MNIST-shaped IDX files, and a workdir holding an mlp30 teacher trained on them."""
    root = tmp_path_factory.mktemp("distributed")
    write_mnist_like(root / "data" / "MNIST" / "raw", n_train=N_TRAIN, n_test=100)
    (root / "tmp").mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("KDRUN_DEBUG", "HYDRA_FULL_ERROR", "WORLD_SIZE", "RANK",
                                                             "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(KDRUN_DATA=str(root / "data"), OMP_NUM_THREADS="1", TMPDIR=str(root / "tmp"))
    kdrun(KDRUN, ["train", *TEACHER, *COMMON[:3]], env, root / "teacher_work", root)
    return {"root": root, "env": env}


def kdrun(launcher, args, env, workdir, cwd):
    proc = subprocess.run([*launcher, *args], env={**env, "KDRUN_WORKDIR": str(workdir)}, cwd=cwd,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def files(root):
    return {p.relative_to(root) for p in Path(root).rglob("*") if p.is_file()}


def only_run(workdir):
    runs = list((workdir / "runs" / "distill").iterdir())
    assert len(runs) == 1, runs
    return runs[0]


def metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
@pytest.mark.parametrize("name", RUNS)
def test_two_gloo_processes_train_the_model_one_process_does(world, name):
    root, env = world["root"], world["env"]
    single, parallel = root / f"{name}_single", root / f"{name}_torchrun"
    for workdir in (single, parallel):
        shutil.copytree(root / "teacher_work" / "teachers", workdir / "teachers")
    before = files(parallel)
    args = ["distill", *COMMON, *RUNS[name]]
    kdrun(KDRUN, args, env, single, root)
    kdrun(TORCHRUN, args, env, parallel, root)

    a, b = only_run(single), only_run(parallel)  # rank 1 made no run dir of its own
    wa = torch.load(a / "model.pt", weights_only=True)["model"]
    wb = torch.load(b / "model.pt", weights_only=True)["model"]
    assert wa.keys() == wb.keys()
    for k in wa:  # the same sums, added in another order: float32 rounding apart
        assert torch.allclose(wa[k], wb[k], rtol=1e-5, atol=1e-6), (k, (wa[k] - wb[k]).abs().max())
    rows_a, rows_b = metrics(a), metrics(b)
    assert len(rows_a) == len(rows_b) == 2
    for ra, rb in zip(rows_a, rows_b):
        assert ra.keys() == rb.keys()
        assert {k: ra[k] for k in ("epoch", "step", "test_errors", "n_test")} == \
               {k: rb[k] for k in ("epoch", "step", "test_errors", "n_test")}
        for k in ra.keys() - {"seconds", "train_accuracy"}:
            assert rb[k] == pytest.approx(ra[k], rel=1e-5, abs=1e-7), k
        assert abs(ra["train_accuracy"] - rb["train_accuracy"]) <= 1 / N_TRAIN  # an argmax on a knife's edge

    # only rank 0 wrote: its run dir, and (distilled) the soft-target cache, computed once
    new = files(parallel) - before
    assert {p.parts[0] for p in new} == ({"runs", "soft_targets"} if name == "distilled" else {"runs"})
    assert not list((root / "tmp").glob("kdrun-rank*"))  # rank 1's private run dir is gone


def test_scaled_shard_gradients_average_to_the_global_batch_gradient():
    torch.manual_seed(0)
    model = torch.nn.Linear(5, 3)
    x, y = torch.randn(13, 5), torch.randint(0, 3, (13,))
    batch = Batch(x, y, torch.arange(100, 113))

    def grads(b, scale=lambda loss, n: loss):
        model.zero_grad()
        scale(F.cross_entropy(model(b.x), b.y), b.x.shape[0]).backward()
        return [p.grad.clone() for p in model.parameters()]

    expected = grads(batch)
    for world in (2, 3, 4):
        shards = [distributed.shard(batch, r, world) for r in range(world)]
        assert torch.equal(torch.cat([s.idx for s in shards]), batch.idx)  # contiguous, in order, all of it
        assert torch.equal(torch.cat([s.y for s in shards]), y)
        assert max(len(s.idx) for s in shards) - min(len(s.idx) for s in shards) <= 1
        per_rank = [grads(s, lambda loss, n: distributed.scaled(loss, n, 13, world)) for s in shards]
        average = [sum(g) / world for g in zip(*per_rank)]  # what DDP's all-reduce computes
        for got, want in zip(average, expected):
            assert torch.allclose(got, want, rtol=1e-5, atol=1e-7)
    assert distributed.shard(batch, 0, 1) is batch


def test_a_batch_too_small_to_split_is_refused(monkeypatch):
    from kdrun.errors import KdrunError

    distributed.check_batches(301, 41)  # one process: anything goes
    monkeypatch.setenv("WORLD_SIZE", "2")
    distributed.check_batches(300, 41)
    with pytest.raises(KdrunError, match=r"a batch of 1 example\(s\) \(288 examples, batch_size=41\) cannot be split"):
        distributed.check_batches(288, 41)
