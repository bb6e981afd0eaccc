"""A split streamed through a DataLoader gives the very batches of the split held in memory (same order, same
jitter and flip draws), so training, subsets and exact mid-epoch resume are the same on both paths."""

import json
import logging
import signal

import pytest
import torch
from omegaconf import OmegaConf

from kdrun import interrupt
from kdrun.checkpoint import Checkpointer
from kdrun.data.batches import DeviceData, StreamData
from kdrun.data.memory import channel_stats, hold, normalisation
from kdrun.errors import KdrunError
from kdrun.loop import fit
from kdrun.models import MLP
from kdrun.objectives import CrossEntropy


def images_and_labels(n=150, shape=(3, 6, 5)):
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (n, *shape), generator=g, dtype=torch.uint8), torch.arange(n) % 10


MEAN, STD = [0.2, 0.5, 0.7], [0.3, 0.25, 0.2]


def both(workers=0):
    images, labels = images_and_labels()
    return (DeviceData(images, labels, MEAN, STD, "cpu"),
            StreamData(images, labels, MEAN, STD, "cpu", workers=workers))


def assert_same_batches(a, b, **kwargs):
    ga, gb = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    pairs = list(zip(a.batches(32, generator=ga, **kwargs), b.batches(32, generator=gb, **kwargs), strict=True))
    assert len(pairs) == a.n_batches(32) == b.n_batches(32)
    for x, y in pairs:
        assert torch.equal(x.x, y.x) and torch.equal(x.y, y.y) and torch.equal(x.idx, y.idx)
    assert torch.equal(ga.get_state(), gb.get_state())  # the same draws, as many of them
    return pairs


@pytest.mark.parametrize("workers", [0, 2])
def test_streamed_batches_equal_in_memory_batches(workers):
    memory, streamed = both(workers)
    pairs = assert_same_batches(memory, streamed, shuffle=True, jitter=2, flip=True)
    assert not torch.equal(pairs[0][0].idx, torch.arange(32))  # shuffled, really
    assert_same_batches(memory, streamed)  # in order, un-augmented (predict, evaluate)
    assert_same_batches(memory, streamed, shuffle=True, jitter=1)  # a second pass of the persistent loader
    rows = torch.tensor([5, 17, 3, 99, 140, 64, 2])
    sub_m, sub_s = memory.subset(rows), streamed.subset(rows)
    assert torch.equal(sub_m.labels, sub_s.labels)
    pairs = assert_same_batches(sub_m.subset(torch.tensor([6, 0, 2])), sub_s.subset(torch.tensor([6, 0, 2])),
                                shuffle=True, flip=True)
    assert sorted(pairs[0][1].idx.tolist()) == [2, 3, 5]  # rows of the whole split


def _train(data, tmp_path, checkpointer=None, stop_at=None):
    torch.manual_seed(0)
    model = MLP([3, 6, 5], 10, [16])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)

    class Counted(CrossEntropy):
        steps = 0

        def forward(self, m, batch, progress):
            self.steps += 1
            if self.steps == stop_at:  # as SIGTERM would: the loop ends this step, checkpoints and stops
                interrupt._state["requested"] = signal.SIGTERM
            return super().forward(m, batch, progress)

    counted = Counted()

    class Rows:
        name, rows = "test", []

        def keep_epochs(self, n):
            self.rows = self.rows[:n]

        def epoch_end(self, row):
            self.rows.append(row)

    rec = Rows()
    try:
        fit(model, counted, data, data, optimizer, scheduler, epochs=2, batch_size=32, jitter=2, flip=True,
            generator=torch.Generator().manual_seed(3), recorder=rec, checkpointer=checkpointer, progress=False)
    finally:
        interrupt._state["requested"] = None
    return model.state_dict(), rec.rows


def test_training_on_either_path_gives_the_same_weights_and_resumes_exactly(tmp_path):
    memory, streamed = both(workers=0)
    w_memory, rows_memory = _train(memory, tmp_path)
    w_stream, rows_stream = _train(streamed, tmp_path)
    assert w_memory.keys() == w_stream.keys() and all(torch.equal(w_memory[k], w_stream[k]) for k in w_memory)
    assert [r["loss"] for r in rows_memory] == [r["loss"] for r in rows_stream]

    ckpt = Checkpointer(tmp_path / "last.pt", "key", "a test", resume=True)
    with pytest.raises(interrupt.Interrupted):
        _train(streamed, tmp_path, ckpt, stop_at=7)  # 5 steps an epoch: stopped mid-epoch 2
    assert ckpt.load()["batch"] == 2
    w_resumed, _ = _train(streamed, tmp_path, ckpt)
    assert all(torch.equal(w_resumed[k], w_stream[k]) for k in w_stream)


def ds_config(**over):
    return OmegaConf.create({"in_memory": "auto", "max_memory_gb": None, "workers": 0, **over})


def test_hold_streams_over_the_budget_or_when_asked_and_logs_how(caplog):
    images, labels = images_and_labels()
    rows = torch.arange(0, 150, 2)
    with caplog.at_level(logging.INFO, logger="kdrun"):
        held = hold("d", "train", images, labels, rows, MEAN, STD, torch.device("cpu"), ds_config())
        over = hold("d", "train", images, labels, rows, MEAN, STD, torch.device("cpu"),
                    ds_config(max_memory_gb=1e-6))
        asked = hold("d", "test", images, labels, rows, MEAN, STD, torch.device("cpu"), ds_config(in_memory=False))
        forced = hold("d", "test", images, labels, rows, MEAN, STD, torch.device("cpu"),
                      ds_config(in_memory=True, max_memory_gb=1e-6))
    assert [type(d).__name__ for d in (held, over, asked, forced)] == ["DeviceData", "StreamData", "StreamData",
                                                                      "DeviceData"]
    assert held.nbytes() == over.nbytes() == 75 * 90
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0] == "d train: 75 images [3, 6, 5], 0.00644 MiB held on cpu"
    assert lines[1] == ("d train: 75 images [3, 6, 5], 0.00644 MiB streamed from host memory (over the memory "
                        "budget of 0.00102 MiB; 0 DataLoader workers)")
    assert lines[2].endswith("streamed from host memory (dataset.in_memory=false; 0 DataLoader workers)")
    assert_same_batches(held, over, shuffle=True, jitter=1, flip=True)


def test_auto_mean_and_std_are_the_train_pixels_per_channel():
    images = torch.tensor([[[[0, 255]], [[51, 51]]], [[[255, 255]], [[102, 0]]]], dtype=torch.uint8)  # [2, 2, 1, 2]
    mean, std = channel_stats(images, torch.arange(2))
    assert mean == pytest.approx([0.75, 0.2], abs=1e-6)
    assert std == pytest.approx([(0.75 * 0.25) ** 0.5, ((0.04 + 0.04 + 0.16 + 0) / 4 - 0.04) ** 0.5], abs=1e-6)
    mean1, std1 = channel_stats(images, torch.tensor([1]))
    assert mean1 == pytest.approx([1.0, 0.2], abs=1e-6) and std1[0] == 0
    ds = OmegaConf.create({"name": "d", "mean": "auto", "std": "auto"})
    with pytest.raises(KdrunError) as e:
        normalisation(ds, images, torch.tensor([1]))
    assert str(e.value) == "dataset.std=auto: a channel of the train split is constant (std 0); set dataset.std"
    assert normalisation(OmegaConf.create({"name": "d", "mean": "auto", "std": 0.5}), images, torch.tensor([1])) == (
        pytest.approx([1.0, 0.2]), 0.5)


@pytest.mark.slow
def test_cli_streamed_run_equals_the_in_memory_run(kdrun, workdir, tmp_path):
    from test_readers import write_tree

    root = tmp_path / "tree"
    write_tree(root)
    common = ["train", "teacher=mlp30", "dataset=imagefolder", f"dataset.root={root}", "dataset.num_classes=3",
              "dataset.size=8", "epochs=1", "batch_size=4", "device=cpu", "teacher.recipe.jitter=1",
              "teacher.recipe.flip=true"]
    memory = kdrun(*common)
    streamed = kdrun(*common, "dataset.in_memory=false", "dataset.workers=1", "retrain=true")
    assert "held on cpu" in memory.stderr and "decoded 12 images" in memory.stderr
    assert "streamed from its memory-mapped cache file (dataset.in_memory=false" in streamed.stderr
    assert "from the cache" in streamed.stderr and "train split's own statistics" in streamed.stderr
    runs = sorted((workdir / "runs" / "train").iterdir())
    w = [torch.load(r / "model.pt", weights_only=True)["model"] for r in runs]
    assert all(torch.equal(w[0][k], w[1][k]) for k in w[0])
    assert [json.loads((r / "results.json").read_text())["n_train"] for r in runs] == [12, 12]


def test_a_specialists_relabelled_rows_stream_as_they_batch_in_memory():
    """kdrun specialists trains each specialist on some rows relabelled to its classes and a dustbin:
    streamed or in memory, the same batches."""
    from kdrun.commands.specialists import relabelled
    from kdrun.specialists.dustbin import Specialty

    specialty = Specialty((4, 1), num_classes=10)
    rows = torch.tensor([1, 4, 11, 14, 21, 3, 7, 40, 41, 44])
    for part_rows in (rows, None):
        memory, streamed = (relabelled(split, part_rows, specialty) for split in both())
        assert isinstance(streamed, StreamData)
        pairs = assert_same_batches(memory, streamed, shuffle=True, jitter=1, flip=True)
        labels = torch.cat([b.y for _, b in pairs])
        assert labels.max() == 2 and set(labels.tolist()) <= {0, 1, 2}  # 4 -> 0, 1 -> 1, the rest the dustbin
        if part_rows is not None:
            ordered = assert_same_batches(memory, streamed)
            assert torch.equal(ordered[0][1].y, specialty.to_local(images_and_labels()[1][rows]))


def test_a_command_that_needs_the_pixels_in_memory_says_so():
    _, streamed = both()
    with pytest.raises(KdrunError) as e:
        streamed.images
    assert str(e.value) == ("this command needs the whole split in memory, but it is streamed; set "
                            "dataset.in_memory=true (or a larger dataset.max_memory_gb)")
