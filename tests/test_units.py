"""The pieces under the CLI: training loop guards, cache reuse, recipes, schedules, models."""

import json
import logging
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from conftest import QUICK
from kdrun import soft_targets, store
from kdrun.cli import conf_dir
from kdrun.data.batches import DeviceData
from kdrun.errors import KdrunError
from kdrun.loop import fit
from kdrun.models import MLP
from kdrun.objectives import CachedLogits, HintonKD
from kdrun.objectives.base import Objective
from kdrun.parts import fold_recipe_overrides
from kdrun.schedules import Anneal, Constant, LrShape


# the transfer identity of a data set the store's keys are computed for, with no files read
DATA = {"files": {"train-images-idx3-ubyte": "0" * 16, "train-labels-idx1-ubyte": "1" * 16}}


def config(name="distill", overrides=()):
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        return compose(config_name=name, overrides=list(overrides))


def tiny_data(n=64):
    g = torch.Generator().manual_seed(0)
    return DeviceData(torch.randint(0, 256, (n, 1, 28, 28), generator=g, dtype=torch.uint8),
                      torch.arange(n) % 10, 0.5, 0.5, "cpu")


class Scripted(Objective):
    """An objective whose forward is a plain function of (model, batch, progress)."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, model, batch, progress):
        return self.fn(model, batch, progress)


class NullRecorder:
    name = "test"

    def __init__(self):
        self.rows = []

    def keep_epochs(self, n):
        self.rows = self.rows[:n]

    def epoch_end(self, row):
        self.rows.append(row)


def test_non_finite_loss_stops_the_run_with_epoch_step_and_lr():
    model = MLP([1, 28, 28], 10, [8])
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)

    def objective(m, batch, progress):
        logits = m(batch.x)
        return logits, logits.sum() * float("nan"), {}

    with pytest.raises(KdrunError) as e:
        fit(model, objective, tiny_data(), tiny_data(), opt, sched, epochs=2, batch_size=16, jitter=0,
            generator=torch.Generator().manual_seed(0), recorder=NullRecorder(), progress=False)
    assert str(e.value) == "loss is nan at epoch 1 step 1 (lr=0.1)"


def test_a_loss_that_turns_nan_keeps_the_last_good_checkpoint(tmp_path):
    from kdrun.checkpoint import Checkpointer

    model = MLP([1, 28, 28], 10, [8])
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, LrShape(12))
    steps = []

    def objective(m, batch, progress):  # 4 steps an epoch; the 7th (epoch 2) diverges
        steps.append(1)
        logits = m(batch.x)
        loss = torch.nn.functional.cross_entropy(logits, batch.y)
        return logits, loss * (float("nan") if len(steps) == 7 else 1.0), {}

    checkpointer = Checkpointer(tmp_path / "last.pt", "key", "a test", resume=True)
    with pytest.raises(KdrunError, match=r"^loss is nan at epoch 2 step 7 \(lr="):
        fit(model, Scripted(objective), tiny_data(), tiny_data(), opt, sched, epochs=3, batch_size=16, jitter=0,
            generator=torch.Generator().manual_seed(0), recorder=NullRecorder(), checkpointer=checkpointer,
            progress=False)
    kept = checkpointer.load()
    assert (kept["epoch"], kept["step"], kept["batch"]) == (1, 4, 0)
    assert all(torch.isfinite(v).all() for v in kept["model"].values())


def test_fit_logs_every_objective_term_per_epoch():
    data = tiny_data()
    teacher_logits = torch.randn(len(data), 10)
    objective = HintonKD(Anneal(8.0, 2.0), Constant(0.5), CachedLogits(teacher_logits))
    model = MLP([1, 28, 28], 10, [16])
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    rec = NullRecorder()
    fit(model, objective, data, data, opt, torch.optim.lr_scheduler.LambdaLR(opt, LrShape(8)), epochs=2,
        batch_size=16, jitter=1, generator=torch.Generator().manual_seed(0), recorder=rec, progress=False)
    assert [r["epoch"] for r in rec.rows] == [1, 2] and rec.rows[-1]["step"] == 8
    first = rec.rows[0]
    assert {"loss", "ce", "kd_scaled", "kd_unscaled", "T", "alpha", "train_accuracy", "test_errors"} <= set(first)
    assert 2.0 < rec.rows[1]["T"] < first["T"] < 8.0  # the annealed T, averaged over each epoch
    assert first["loss"] == pytest.approx(0.5 * first["kd_scaled"] + 0.5 * first["ce"], rel=1e-5)


def test_cache_is_reused_when_its_manifest_matches_and_recomputed_when_not(tmp_path, caplog):
    data = tiny_data(32)
    model = MLP([1, 28, 28], 10, [8]).eval()
    transfer = {"dataset": "x", "split": "train", "limit": None, "subset_seed": 0, "n": 32, "transform": "t"}
    manifest = soft_targets.manifest_for("a" * 64, transfer, 10)
    path = tmp_path / "cache" / "c.pt"
    caplog.set_level(logging.INFO, logger="kdrun")
    first = soft_targets.get_or_compute(path, manifest, model, data)
    assert first.shape == (32, 10) and "wrote" in caplog.text
    assert json.loads(path.with_suffix(".json").read_text()) == manifest

    class Exploding(torch.nn.Module):
        def forward(self, x):
            raise AssertionError("a matching cache must not run the teacher")

    caplog.clear()
    assert torch.equal(soft_targets.get_or_compute(path, manifest, Exploding(), data), first)
    assert "reusing" in caplog.text
    caplog.clear()
    other = {**manifest, "teacher_sha256": "0" * 64}  # the teacher was retrained
    again = soft_targets.get_or_compute(path, other, model, data)
    assert "does not match (manifest differs in teacher_sha256); recomputing" in caplog.text
    assert torch.equal(again, first) and torch.load(path, weights_only=True)["manifest"] == other


def test_recipe_overrides_go_to_the_trained_model_and_change_the_teacher_key():
    cfg = config("train", ["teacher=mlp300", "epochs=3", "lr=0.2", "batch_size=64"])
    folded = fold_recipe_overrides(cfg, ["teacher"])
    r = folded.teacher.recipe
    assert (r.epochs, r.optimizer.lr, r.batch_size) == (3, 0.2, 64)
    assert (folded.epochs, folded.lr, folded.batch_size) == (None, None, None)
    assert folded.student.recipe.epochs == cfg.student.recipe.epochs  # students untouched
    plain = fold_recipe_overrides(config("train", ["teacher=mlp300"]), ["teacher"])
    assert store.teacher_key(folded, 0, DATA) != store.teacher_key(plain, 0, DATA)
    assert store.teacher_key(folded, 0, DATA) != store.teacher_key(folded, 1, DATA)
    # distill looks the teacher up from its own recipe, whatever the student's overrides
    d = fold_recipe_overrides(config("distill", ["teacher=mlp300", "epochs=3"]), ["student"])
    t = fold_recipe_overrides(config("train", ["teacher=mlp300"]), ["teacher"])
    assert store.teacher_key(d, 0, DATA) == store.teacher_key(t, 0, DATA) and d.student.recipe.epochs == 3


def test_every_temperature_in_the_sweep_is_one_objective_config():
    for T in (1, 2, 5, 10, 20):
        cfg = config("distill", [f"T={T}", "alpha=0.5"])
        from hydra.utils import instantiate

        obj = instantiate(cfg.loss, teacher=CachedLogits(torch.zeros(1, 10)))
        assert obj.temperature(0.3) == T and obj.alpha(0.7) == 0.5


def test_schedules():
    assert Constant(3)(0.0) == Constant(3)(1.0) == 3.0
    a = Anneal(20, 4)
    assert (a(0.0), a(0.5), a(1.0), a(2.0)) == (20.0, 12.0, 4.0, 4.0)
    c = Anneal(20, 4, shape="cosine")
    assert c(0.0) == 20.0 and c(1.0) == pytest.approx(4.0) and c(0.25) > a(0.25)
    assert Anneal(0, 0).is_zero() and Constant(0).is_zero() and not Constant(0.1).is_zero()
    cos = LrShape(100)
    assert (cos(0), cos(50), cos(100)) == (1.0, pytest.approx(0.5), 0.0)
    warm = LrShape(100, "constant", warmup_steps=10)
    assert (warm(0), warm(9), warm(50)) == (0.1, 1.0, 1.0)


def test_max_norm_caps_each_units_incoming_weights():
    model = MLP([1, 28, 28], 10, [50, 50], max_norm=0.5)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(100)
    model.constrain()
    for m in model.modules():
        if isinstance(m, torch.nn.Linear):
            assert m.weight.norm(dim=1).max() <= 0.5 + 1e-5


def test_mlp1200_is_the_papers_regularised_teacher_and_mlp800_the_plain_student():
    cfg = config("distill")
    t, s = cfg.teacher, cfg.student
    assert list(t.model.hidden) == [1200, 1200] and t.model.dropout_input > 0 and t.model.dropout_hidden > 0
    assert t.model.max_norm ** 2 == pytest.approx(15, abs=0.01) and t.recipe.jitter == 2
    assert list(s.model.hidden) == [800, 800] and s.model.dropout_hidden == 0 and s.model.max_norm is None
    assert s.recipe.jitter == 0 and cfg.dataset.name == "mnist"


def test_same_seed_same_weights_on_cpu(kdrun, workdir):
    args = ["train", "teacher=mlp30", "epochs=2", *QUICK]
    kdrun(*args)
    kdrun(*args, "retrain=true")
    kdrun(*args, "retrain=true", "seed=1")
    runs = sorted((workdir / "runs" / "train").iterdir())
    weights = [torch.load(r / "model.pt", weights_only=True)["model"] for r in runs]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    assert not all(torch.equal(weights[0][k], weights[2][k]) for k in weights[0])
    rows = [json.loads((r / "results.json").read_text()) for r in runs]
    assert rows[0]["test_errors"] == rows[1]["test_errors"]


def test_a_diverging_run_fails_with_one_line_and_a_failed_status(kdrun, workdir):
    proc = kdrun("train", "teacher=mlp30", "lr=1e30", *QUICK, check=False)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("kdrun: error: loss is ") and " at epoch 1 step " in lines[-1]
    assert not any("Traceback" in line for line in lines)
    run = next((workdir / "runs" / "train").iterdir())
    res = json.loads((run / "results.json").read_text())
    assert res["status"] == "failed" and res["error"] == lines[-1].removeprefix("kdrun: error: ")
    # nothing half-trained reaches the store: only the lock that training held is there
    assert [p.suffix for p in (workdir / "teachers").iterdir()] == [".lock"]


def test_shell_completion_knows_commands_and_group_options(env, tmp_path):
    import subprocess
    import sys

    def query(line):
        return subprocess.run([sys.executable, "-m", "kdrun", "-sc", "query=bash"], env={**env, "COMP_LINE": line},
                              cwd=tmp_path, capture_output=True, text=True, timeout=60).stdout.split()

    assert query("kdrun di") == ["distill"]
    teachers = sorted(p.stem for p in (Path(__file__).resolve().parents[1] / "conf" / "teacher").glob("*.yaml"))
    assert {"cnn", "ensemble", "mlp1200", "tv_resnet18"} <= set(teachers)
    assert query("kdrun distill teacher=") == [f"teacher={t}" for t in teachers]
    assert query("kdrun self") == ["self-distill"]


def test_demo_preset_is_a_cnn_teacher_for_mlp800_on_fashion_mnist():
    cfg = config("pipeline", ["experiment=demo"])
    assert (cfg.teacher.name, cfg.student.name, cfg.dataset.name, cfg.dataset.limit) == ("cnn", "mlp800", "fashion_mnist", 20000)
    assert (cfg.teacher.recipe.epochs, cfg.student.recipe.epochs, cfg.T, cfg.alpha) == (10, 30, 4.0, 0.9)


def test_cached_logits_are_the_teachers_outputs_on_the_very_examples_of_each_shuffled_batch():
    from kdrun.loop import predict

    data = tiny_data(100)
    teacher = MLP([1, 28, 28], 10, [8]).eval()
    cache = CachedLogits(predict(teacher, data, batch_size=7))
    with torch.no_grad():
        for batch in data.batches(16, shuffle=True, generator=torch.Generator().manual_seed(3)):
            assert torch.allclose(cache(batch), teacher(batch.x), atol=1e-6)


def test_logit_matching_objective_weights_the_mse_by_alpha():
    import torch.nn.functional as F

    from kdrun.losses import logit_matching
    from kdrun.objectives import LogitMatching

    data = tiny_data(32)
    teacher_logits = torch.randn(32, 10)
    model = MLP([1, 28, 28], 10, [8])
    batch = next(data.batches(32))
    logits, loss, logs = LogitMatching(Constant(0.3), CachedLogits(teacher_logits))(model, batch, 0.5)
    expected = 0.3 * logit_matching(logits, teacher_logits[batch.idx]) + 0.7 * F.cross_entropy(logits, batch.y)
    assert torch.allclose(loss, expected) and set(logs) == {"ce", "logit_mse", "alpha"}
    with pytest.raises(ValueError, match="needs a teacher"):
        LogitMatching(Constant(0.3))


def test_distill_with_logit_matching(kdrun, workdir):
    teacher = ["teacher=mlp30", "teacher.recipe.epochs=1"]
    kdrun("train", *teacher, *QUICK)
    kdrun("distill", *teacher, *QUICK, "epochs=1", "loss=logit_matching", "alpha=0.5")
    run = next((workdir / "runs" / "distill").iterdir())
    res = json.loads((run / "results.json").read_text())
    row = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    assert res["loss"] == "LogitMatching" and res["status"] == "completed"
    assert row["loss"] == pytest.approx(0.5 * row["logit_mse"] + 0.5 * row["ce"], rel=1e-4)


def test_a_non_finite_logged_term_stops_the_run_at_the_epoch_end():
    model = MLP([1, 28, 28], 10, [8])
    opt = torch.optim.SGD(model.parameters(), lr=0.1)

    def objective(m, batch, progress):
        logits = m(batch.x)
        return logits, logits.pow(2).mean(), {"kd_unscaled": torch.tensor(float("inf"))}

    with pytest.raises(KdrunError, match=r"^non-finite metrics at epoch 1: "):
        fit(model, Scripted(objective), tiny_data(), tiny_data(), opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0),
            epochs=1, batch_size=16, jitter=0, generator=torch.Generator().manual_seed(0), recorder=NullRecorder(),
            progress=False)


def test_train_or_reuse_trains_a_model_once_when_jobs_ask_together(tmp_path):
    import threading
    import time

    calls = []

    def train(checkpointer):
        calls.append(1)
        time.sleep(0.3)  # long enough for the other job to arrive while this one trains
        model = tmp_path / f"run{len(calls)}" / "model.pt"
        model.parent.mkdir()
        model.write_bytes(b"weights")
        return {"model": str(model), "run_dir": str(model.parent), "test_errors": 1}

    got = []
    jobs = [threading.Thread(target=lambda: got.append(store.train_or_reuse(tmp_path / "w", "k1", {"x": 1}, train)))
            for _ in range(2)]
    for job in jobs:
        job.start()
    for job in jobs:
        job.join()
    assert len(calls) == 1
    assert sorted(results is None for _, results in got) == [False, True]  # one trained, one reused
    assert got[0][0] == got[1][0] == tmp_path / "w" / "teachers" / "k1" / "model.pt"
    assert store.train_or_reuse(tmp_path / "w", "k1", {"x": 1}, train, retrain=True)[1] is not None and len(calls) == 2


def test_an_artifact_whose_numbers_changed_after_it_was_written_is_refused(tmp_path):
    from kdrun.io import CHECKSUM, content_digest, load_torch, save_torch

    path = tmp_path / "model.pt"
    weights = {"w": torch.randn(3, 4), "b": torch.zeros(4, dtype=torch.bfloat16), "step": torch.tensor(7)}
    save_torch(path, {"model": weights, "arch": {"hidden": [4]}, "epoch": 2})
    loaded = load_torch(path)
    assert loaded[CHECKSUM] == content_digest(loaded) and torch.equal(loaded["model"]["w"], weights["w"])
    original = loaded["model"]["w"].clone()
    loaded["model"]["w"][1, 2] += 1e-3  # one number edited, the archive rewritten with the old checksum
    torch.save(loaded, path)
    with pytest.raises(KdrunError) as e:
        load_torch(path)
    assert str(e.value) == f"corrupt checkpoint {path}: its content does not match its checksum"
    loaded["model"]["w"] = original
    loaded["epoch"] = 3  # a non-tensor value counts too
    torch.save(loaded, path)
    with pytest.raises(KdrunError, match="does not match its checksum"):
        load_torch(path)


def test_a_bit_flipped_in_a_saved_tensor_is_caught_although_torch_loads_it(tmp_path):
    from kdrun.io import load_torch, save_torch

    path = tmp_path / "last.pt"
    w = torch.arange(1000, dtype=torch.float32)
    save_torch(path, {"w": w})
    data = bytearray(path.read_bytes())
    data[data.find(w.numpy().tobytes()[400:408])] ^= 0xFF  # inside the tensor's record
    path.write_bytes(bytes(data))
    assert not torch.equal(torch.load(path, weights_only=True)["w"], w)  # PyTorch itself notices nothing
    with pytest.raises(KdrunError, match="its content does not match its checksum"):
        load_torch(path)


def test_step_lr_drops_by_gamma_at_each_milestone_fraction():
    # the CIFAR recipe: x0.1 at epochs 150, 180, 210 of 240, here 240 steps
    shape = LrShape(240, "step", milestones=[0.625, 0.75, 0.875], gamma=0.1)
    assert [shape(s) for s in (0, 149, 150, 179, 180, 209, 210, 239)] == pytest.approx(
        [1, 1, 0.1, 0.1, 0.01, 0.01, 0.001, 0.001])
    half = LrShape(24, "step", milestones=[0.625, 0.75, 0.875])  # a tenth of the schedule keeps its shape
    assert [s for s in range(1, 24) if half(s) != half(s - 1)] == [15, 18, 21]


def test_step_lr_needs_milestones():
    with pytest.raises(ValueError, match="lr schedule step needs milestones"):
        LrShape(10, "step")
