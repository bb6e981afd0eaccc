"""The teacher's features computed once over the train split (transfer.cache_features=true) give a
feature objective what the teacher run online on each batch gives, row by row; shifted views and
transfer.augment keep the teacher online, and a cache over the memory budget falls back to it."""

import json
from pathlib import Path

import pytest
import torch

from conftest import CNN_TEACHER, FEATURE_SUBSET, use_teachers
from kdrun.data.batches import DeviceData
from kdrun.models import SmallCNN
from kdrun.models.features import FeatureTap
from kdrun.objectives.teachers import CachedFeatures, OnlineTeacher

STUDENT = ["student=lenet5", "student.recipe.jitter=0", "epochs=1"]


def _online_teacher():
    torch.manual_seed(0)
    model = SmallCNN([1, 12, 12], 3)
    with torch.no_grad():
        model.body[0].bias.add_(0.1)  # no dead ReLUs at initialisation: every stage carries signal
    return OnlineTeacher(model, None, FeatureTap(model, {"s1": "body.2", "s2": "body.5"}, penultimate=True))


def _split(n=37):
    images = torch.randint(0, 256, (n, 1, 12, 12), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    return DeviceData(images, torch.randint(0, 3, (n,)), 0.3, 0.35, "cpu")


def test_cached_features_are_the_online_teachers_on_every_shuffled_batch():
    online, split = _online_teacher(), _split()
    cached = CachedFeatures.of(online, split, batch_size=10)  # 4 batches, the last one short
    assert set(cached.features) == {"s1", "s2", "penultimate"} and cached.logits.shape == (37, 3)
    generator = torch.Generator().manual_seed(2)
    for batch in split.batches(8, shuffle=True, generator=generator):
        logits, feats = cached.outputs(batch)
        want_logits, want = online.outputs(batch, fresh=True)
        torch.testing.assert_close(logits, want_logits, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(cached(batch), want_logits, rtol=1e-5, atol=1e-6)
        assert feats.keys() == want.keys()
        for name in want:
            torch.testing.assert_close(feats[name], want[name], rtol=1e-5, atol=1e-6)


def test_cached_features_follow_the_rows_a_transfer_subset_keeps():
    online, split = _online_teacher(), _split()
    cached = CachedFeatures.of(online, split)
    subset = split.subset(torch.tensor([30, 4, 17]))
    (batch,) = subset.batches(3)
    assert batch.idx.tolist() == [30, 4, 17]
    _, feats = cached.outputs(batch)
    torch.testing.assert_close(feats["s2"], online.outputs(batch, fresh=True)[1]["s2"], rtol=1e-5, atol=1e-6)


def test_a_cache_is_of_a_whole_split_which_batch_idx_indexes():
    split = _split()
    with pytest.raises(ValueError, match="needs a whole split"):
        CachedFeatures.of(_online_teacher(), split.subset(torch.tensor([1, 2])))


def test_the_cache_size_counts_every_stage_in_float32():
    assert CachedFeatures.nbytes({"s1": (2, 32, 14, 14), "penultimate": (2, 256)}, 1000) == 4 * 1000 * (6272 + 256)


# ---------------------------------------------------------------- from the command line


@pytest.fixture
def here(kdrun_here, workdir, cnn_teachers):
    use_teachers(cnn_teachers, workdir)
    return kdrun_here


def _run(here, workdir, *args):
    proc = here("distill", "loss=fitnet", *CNN_TEACHER, *STUDENT, *FEATURE_SUBSET, *args)
    run = max((workdir / "runs" / "distill").iterdir(), key=lambda p: p.stat().st_mtime)
    rows = [json.loads(line) for line in (Path(run) / "metrics.jsonl").read_text().splitlines()]
    return proc, json.loads((run / "results.json").read_text()), rows


@pytest.mark.slow
def test_a_feature_method_trains_alike_from_cached_and_online_teacher_features(here, workdir):
    proc, cached, (cached_row,) = _run(here, workdir)
    assert cached["teacher_features"] == "cached"
    assert "teacher features: computed once over the 300 train rows" in proc.stderr
    _, online, (online_row,) = _run(here, workdir, "transfer.cache_features=false")
    assert online["teacher_features"] == "online"
    for term in ("loss", "ce", "hint"):  # the same batches and targets; only the sums' order differs
        assert cached_row[term] == pytest.approx(online_row[term], rel=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("args, why", [
    (["student.recipe.jitter=1"], None),  # the teacher must see the shifted view
    (["student.recipe.jitter=1", "transfer.augment=true"], None),
    (["dataset.max_memory_gb=0.0001", "dataset.workers=0"], "over the memory budget of"),
])
def test_the_teacher_runs_online_when_its_cached_features_would_not_serve(here, workdir, args, why):
    proc, results, _ = _run(here, workdir, *args)
    assert results["teacher_features"] == "online"
    if why:
        assert why in proc.stderr and "the teacher runs online" in proc.stderr
