"""Data-parallel training under torchrun: a 2-process gloo run trains the model one process would with
the same global batch (to float tolerance), and only rank 0 writes; every distillation method runs under
it, its ranks holding one model and one objective state."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import CNN_TEACHER, FEATURE_SUBSET, KDRUN, kdrun_in_process, use_teachers, write_mnist_like
from kdrun import distributed
from kdrun.data.batches import Batch
from kill_resume import assert_same

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


# ---------------------------------------------------------------- every method

# 300 Fashion-MNIST images, batch 41: 7 x 41 + 13, every batch split 21/20 over two ranks (the last 7/6);
# lenet5's SGD at lr 0.05 sends DIST to NaN on such small batches, 0.01 trains every method
METHOD_STUDENT = [*CNN_TEACHER, *FEATURE_SUBSET, "device=cpu", "student=lenet5", "epochs=1", "batch_size=41",
                  "student.recipe.optimizer.lr=0.01"]
CACHED = ["student.recipe.jitter=0"]  # the logit methods read cached soft targets, of unshifted images
METHODS = {
    "hinton": ["loss=hinton", *CACHED],
    "hinton standardize": ["loss=hinton", "loss.standardize=true", *CACHED],
    "dkd": ["loss=dkd", "loss.warmup_epochs=0", *CACHED],
    "dist": ["loss=dist", *CACHED],
    "fitnet": ["loss=fitnet", "loss.regressor_bn=false"],  # BatchNorm's batch statistics are per process
    "at": ["loss=at"],
    "rkd": ["loss=rkd"],
    "sp": ["loss=sp"],
    "pkt": ["loss=pkt"],
    "crd": ["loss=crd"],
}
# relations across the batch (DIST's intra-class term, RKD's distances and angles, SP's similarities, PKT's
# distributions) are computed over each process's share of the batch: not the one-process run's (docs/methods.md)
PER_PROCESS_BATCH = {"dist", "rkd", "sp", "pkt"}
TORCHRUN_RUNS = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
                 str(Path(__file__).with_name("torchrun_runs.py"))]


@pytest.fixture(scope="module")
def method_runs(tmp_path_factory, data_dir, cnn_teachers):
    """Each method distilled from the session's cnn teacher in one process (in this one), and under one
    torchrun launch of two gloo processes for all of them (tests/torchrun_runs.py)."""
    root = tmp_path_factory.mktemp("methods_torchrun")
    (root / "tmp").mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("KDRUN_DEBUG", "HYDRA_FULL_ERROR", "WORLD_SIZE", "RANK",
                                                             "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(KDRUN_DATA=str(data_dir), OMP_NUM_THREADS="1", TMPDIR=str(root / "tmp"))
    plan = {}
    for name, extra in METHODS.items():
        args = [*METHOD_STUDENT, *extra]
        for where in ("single", "torchrun"):
            use_teachers(cnn_teachers, root / name / where)
        proc = kdrun_in_process(["distill", *args], env={**env, "KDRUN_WORKDIR": str(root / name / "single")},
                                cwd=root)
        assert proc.returncode == 0, proc.stderr[-3000:]
        plan[name] = {"workdir": str(root / name / "torchrun"), "args": args}
    (root / "plan.json").write_text(json.dumps(plan))
    (root / "ranks").mkdir()
    proc = subprocess.run([*TORCHRUN_RUNS, str(root / "plan.json"), str(root / "ranks")], env=env, cwd=root,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root


def assert_close(a, b, where):
    """Floating tensors to float32 rounding, anything else exactly, through nested dicts."""
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_close(a[k], b[k], f"{where}/{k}")
    elif torch.is_tensor(a) and a.is_floating_point():
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6), (where, (a - b).abs().max())
    else:
        assert_same(a, b, where)


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_every_method_trains_under_two_gloo_processes(method_runs, method):
    single, parallel = only_run(method_runs / method / "single"), only_run(method_runs / method / "torchrun")
    ranks = [torch.load(method_runs / "ranks" / f"{method}.rank{r}.pt", weights_only=True) for r in (0, 1)]
    # one model and one objective on both ranks, bit for bit: DDP averages the student's gradients, the
    # loop those of the objective's own parameters (FitNet's regressor, CRD's embeddings); CRD's banks,
    # Z and negatives follow the whole batch on every rank
    assert_same(ranks[0], ranks[1], "rank 1 against rank 0")
    last = torch.load(parallel / "checkpoints" / "last.pt", weights_only=True)
    assert_same({"model": last["model"], "objective": last["objective"]}, ranks[0], "rank 0's run dir")
    if method == "fitnet":
        assert "regressor.0.weight" in last["objective"]
    if method == "crd":
        assert {"bank_s", "bank_t", "z"} <= last["objective"].keys()
    rows_single, rows_parallel = metrics(single), metrics(parallel)
    assert [r.keys() for r in rows_single] == [r.keys() for r in rows_parallel]
    if method in PER_PROCESS_BATCH:
        return
    reference = torch.load(single / "checkpoints" / "last.pt", weights_only=True)
    for part in ("model", "objective"):  # the same sums, added in another order: float32 rounding apart
        assert_close(last[part], reference[part], part)
    for ra, rb in zip(rows_single, rows_parallel):
        assert (ra["test_errors"], ra["n_test"]) == (rb["test_errors"], rb["n_test"])
        for k in ra.keys() - {"seconds", "train_accuracy", "test_errors", "n_test"}:
            assert rb[k] == pytest.approx(ra[k], rel=1e-5, abs=1e-7), k
        assert abs(ra["train_accuracy"] - rb["train_accuracy"]) <= 1 / 300  # an argmax on a knife's edge
    assert not list((method_runs / "tmp").glob("kdrun-rank*"))  # rank 1's private run dirs are gone
