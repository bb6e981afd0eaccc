"""Any nn.Module through the real CLI: a user's classes from a file on PYTHONPATH as teacher and student
(train, soft-targets, distill, report, resume), torchvision's ResNet-18 distilled into a small model on a
3-channel dataset, a plain state_dict trained elsewhere as the teacher, and the one-line refusals."""

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

FAULT_AT = [sys.executable, str(Path(__file__).with_name("fault_at.py"))]
SMALL = ["dataset=fashion_mnist", "dataset.limit=300", "dataset.test_limit=100", "progress=false", "device=cpu"]

USER_MODELS = '''
import torch
from torch import nn


class Net(nn.Module):
    """A convnet with its own names: no `head`, no `features`, no `constrain`."""

    def __init__(self, num_classes, width=8):
        super().__init__()
        self.conv = nn.Conv2d(1, width, 3, padding=1)
        self.fc = nn.Linear(width * 7 * 7, num_classes)

    def forward(self, x):
        return self.fc(torch.flatten(nn.functional.max_pool2d(torch.relu(self.conv(x)), 4), 1))


class Tiny(nn.Module):
    def __init__(self, num_classes):
        super().__init__()
        self.layers = nn.Sequential(nn.Flatten(), nn.Linear(784, 16), nn.ReLU(), nn.Linear(16, num_classes))

    def forward(self, x):
        return self.layers(x)


class Headless(nn.Module):
    def __init__(self, num_classes):
        super().__init__()
        self.conv = nn.Conv2d(1, num_classes, 1)

    def forward(self, x):
        return self.conv(x).mean((2, 3))
'''

TEACHER = ["teacher=mlp30", "teacher.name=mynet", "~teacher.model", "+teacher.model={_target_:mymodels.Net}",
           "teacher.recipe.epochs=1"]
STUDENT = ["student=mlp30", "student.name=tiny", "~student.model", "+student.model={_target_:mymodels.Tiny}"]


@pytest.fixture
def user_env(tmp_path):
    folder = tmp_path / "usermods"
    folder.mkdir()
    (folder / "mymodels.py").write_text(USER_MODELS)
    return {"PYTHONPATH": str(folder)}


def results(run_dir):
    return json.loads((Path(run_dir) / "results.json").read_text())


def runs(workdir, command):
    return sorted((workdir / "runs" / command).iterdir())


@pytest.mark.slow
def test_a_users_classes_train_distill_report_and_resume(kdrun, env, tmp_path, workdir, user_env):
    kdrun("train", *TEACHER, *SMALL, extra_env=user_env)
    teacher = results(runs(workdir, "train")[0])
    assert teacher["status"] == "completed" and teacher["n_params"] == 8 * 9 + 8 + 8 * 49 * 10 + 10
    stored = torch.load(teacher["model"], weights_only=True)
    assert stored["num_classes"] == 10 and stored["arch"] == {"_target_": "mymodels.Net"}
    kdrun("soft-targets", *TEACHER, *SMALL, extra_env=user_env)
    distill = ["distill", *TEACHER, *STUDENT, *SMALL, "epochs=2", "T=4"]
    kdrun(*distill, extra_env=user_env)
    reference = runs(workdir, "distill")[0]
    student = results(reference)
    assert (student["status"], student["student"], student["teacher"]) == ("completed", "tiny", "mynet")
    assert student["n_params"] == 784 * 16 + 16 + 16 * 10 + 10
    kdrun("report", str(workdir / "runs" / "distill"), extra_env=user_env)
    table = list(csv.DictReader(open(workdir / "runs" / "distill" / "report.csv")))
    errors = {r["role"]: float(r["errors_mean"]) for r in table}
    assert errors == {"teacher": teacher["test_errors"], "distilled": student["test_errors"]}
    # stopped after its 4th step (300 images, batch 128: 3 steps an epoch), then resumed: the same weights
    proc = subprocess.run([*FAULT_AT, "sigterm", "4", *distill], env={**env, **user_env}, cwd=tmp_path,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 143, proc.stderr[-2000:]
    stopped = [r for r in runs(workdir, "distill") if r != reference][0]
    assert results(stopped)["status"] == "interrupted"
    kdrun("resume", str(stopped), extra_env=user_env)
    assert results(stopped)["status"] == "completed"
    a, b = (torch.load(r / "model.pt", weights_only=True)["model"] for r in (reference, stopped))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_a_model_lacking_a_capability_is_refused_in_one_line(kdrun_here, user_env, tmp_path):
    headless = ["~student.model", "+student.model={_target_:mymodels.Headless}"]
    sys.path.insert(0, user_env["PYTHONPATH"])  # the in-process CLI imports from sys.path
    try:
        out = kdrun_here("distill", "teacher=mlp30", "student=mlp30", *headless, *SMALL, "transfer.exclude_classes=[3]",
                         "transfer.val_size=100", "transfer.bias_correction=true", check=False)
        assert out.returncode == 2
        assert out.stderr.strip().splitlines() == [
            "kdrun: error: transfer.bias_correction=true needs the model's final nn.Linear layer (its head), but "
            "Headless has no nn.Linear layer to serve as its head (name one with head: in the model config)"]
        out = kdrun_here("specialists", "teacher=mlp30", "~teacher.model", "+teacher.model={_target_:mymodels.Headless}",
                         *SMALL, "transfer.val_size=100", check=False)
        assert out.returncode == 2
        assert out.stderr.strip().splitlines() == [
            "kdrun: error: kdrun specialists needs the model's final nn.Linear layer (its head), but "
            "Headless has no nn.Linear layer to serve as its head (name one with head: in the model config)"]
        out = kdrun_here("self-distill", "student=mlp30", *headless, *SMALL, check=False)
        assert out.returncode == 2
        assert out.stderr.strip().splitlines() == [
            "kdrun: error: kdrun self-distill (its penultimate features, the head's input) needs the model's final "
            "nn.Linear layer (its head), but Headless has no nn.Linear layer to serve as its head (name one with head: "
            "in the model config)"]
        out = kdrun_here("train", "teacher=tv_resnet18", *SMALL, check=False)
        assert out.returncode == 2
        assert out.stderr.strip().splitlines() == [
            "kdrun: error: invalid teacher config: ResNet does not take inputs of shape [1, 28, 28]: its first "
            "convolution takes 3 channels, the data have 1"]
        assert not (tmp_path / "work").exists()  # refused before anything was written
    finally:
        sys.path.remove(user_env["PYTHONPATH"])


@pytest.mark.slow
def test_torchvision_resnet18_distils_into_a_small_model_and_a_state_dict_from_elsewhere_teaches(
        kdrun, workdir, cifar_dir, tmp_path):
    cifar = ["dataset=cifar10", f"data_dir={cifar_dir}", "progress=false", "device=cpu"]
    teacher = ["teacher=tv_resnet18", "teacher.recipe.epochs=1", "teacher.recipe.batch_size=50"]
    kdrun("train", *teacher, *cifar)
    kdrun("distill", *teacher, "student=mlp30", *cifar, "epochs=1", "T=4")
    res = results(runs(workdir, "distill")[0])
    assert (res["status"], res["teacher"], res["n_train"], res["n_test"]) == ("completed", "tv_resnet18", 100, 20)
    # a ResNet-18 trained elsewhere: a plain state_dict, its architecture named by teacher=
    import torchvision

    torch.manual_seed(0)
    elsewhere = tmp_path / "resnet18_elsewhere.pt"
    torch.save(torchvision.models.resnet18(num_classes=10).state_dict(), elsewhere)
    kdrun("distill", "teacher=tv_resnet18", f"teacher_ckpt={elsewhere}", "student=mlp30", *cifar, "epochs=1")
    res = results(runs(workdir, "distill")[1])
    assert res["status"] == "completed" and res["teacher_ckpt"] == str(elsewhere)
    torch.save(torchvision.models.resnet18(num_classes=100).state_dict(), elsewhere)
    out = kdrun("distill", "teacher=tv_resnet18", f"teacher_ckpt={elsewhere}", "student=mlp30", *cifar, "epochs=1",
                check=False)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        f"kdrun: error: teacher checkpoint {elsewhere} has 100 outputs (fc.weight is [100, 512]), not the 10 classes "
        "of cifar10"]
    out = kdrun("distill", f"teacher_ckpt={elsewhere}", "student=mlp30", *cifar, "epochs=1", check=False)
    assert out.stderr.strip().splitlines() == [
        f"kdrun: error: teacher checkpoint {elsewhere} is a plain state_dict, which records no architecture; pass it as "
        f"teacher_ckpt={elsewhere} with teacher=NAME naming its architecture"]


def write_image_tree(root, n_train=8, n_test=4):
    """Two classes of PNGs: RGB 16x16, grey 16x16 and RGB 20x24 (resized and cropped), the class a bright half."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("test", n_test)):
        for c, name in enumerate(("left", "right")):
            for i in range(n):
                h, w, grey = [(16, 16, False), (16, 16, True), (20, 24, False)][i % 3]
                array = rng.integers(0, 60, (h, w) if grey else (h, w, 3), dtype=np.uint8)
                array[:, c * (w // 2):(c + 1) * (w // 2)] += 180
                path = root / split / name / f"{i}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(array).save(path)


@pytest.mark.slow
def test_torchvision_resnet18_distils_into_a_small_model_on_an_image_folder(kdrun, workdir, tmp_path):
    write_image_tree(tmp_path / "pets")
    tree = ["dataset=imagefolder", f"dataset.root={tmp_path / 'pets'}", "dataset.num_classes=2", "dataset.size=16",
            "progress=false", "device=cpu"]
    teacher = ["teacher=tv_resnet18", "teacher.recipe.epochs=1", "teacher.recipe.batch_size=8"]
    kdrun("train", *teacher, *tree)
    kdrun("distill", *teacher, "student=mlp30", *tree, "epochs=1", "T=4")
    res = results(runs(workdir, "distill")[0])
    assert (res["status"], res["teacher"], res["student"], res["n_train"], res["n_test"]) == (
        "completed", "tv_resnet18", "mlp30", 16, 8)
    assert res["config"]["dataset"]["shape"] == [3, 16, 16]
