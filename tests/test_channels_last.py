"""channels_last=true: the same training in another memory layout, so the same weights to float tolerance."""

from pathlib import Path

import pytest
import torch

CIFAR = ["dataset=cifar10", "dataset.test_limit=10", "progress=false", "epochs=1", "batch_size=50"]


def _weights(workdir, command):
    run = max((Path(workdir) / "runs" / command).iterdir(), key=lambda p: p.stat().st_mtime)
    return torch.load(run / "model.pt", weights_only=True)["model"]


@pytest.mark.slow
def test_channels_last_trains_the_same_weights_teacher_online_too(kdrun_here, cifar_dir, env):
    data = [*CIFAR, f"data_dir={cifar_dir}"]  # 100 training images: two steps of 50
    teacher = ["teacher=resnet8"]
    kdrun_here("train", *teacher, *data)
    plain = _weights(env["KDRUN_WORKDIR"], "train")
    kdrun_here("train", *teacher, *data, "channels_last=true", "retrain=true")
    nhwc = _weights(env["KDRUN_WORKDIR"], "train")
    student = [*teacher, "teacher.recipe.epochs=1", "teacher.recipe.batch_size=50", "student=resnet8",
               "transfer.augment=true"]
    kdrun_here("distill", *student, *data)
    distilled = _weights(env["KDRUN_WORKDIR"], "distill")
    kdrun_here("distill", *student, *data, "channels_last=true")
    distilled_nhwc = _weights(env["KDRUN_WORKDIR"], "distill")
    for a, b in ((plain, nhwc), (distilled, distilled_nhwc)):
        assert a.keys() == b.keys()
        for name, w in a.items():
            # float32 rounding of another summation order: up to 1.1e-5 on one thread, weights about 0.4
            torch.testing.assert_close(b[name], w, rtol=1e-4, atol=5e-5, msg=name)
    assert nhwc["stem.0.weight"].is_contiguous(memory_format=torch.channels_last)  # it really ran channels-last
    assert not plain["stem.0.weight"].is_contiguous(memory_format=torch.channels_last)


def test_channels_last_must_be_a_boolean(kdrun_here):
    proc = kdrun_here("train", "teacher=resnet8", "dataset=cifar10", "channels_last=maybe", check=False)
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines()[-1] == "kdrun: error: channels_last must be true or false, got 'maybe'"
