"""Every bad input ends in one `kdrun: error: ...` line, a non-zero exit, and an untouched workdir."""

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from conftest import KDRUN, QUICK, kdrun_in_process, use_teachers, write_mnist_like
from kdrun.models import MLP

T30 = ["teacher=mlp30", "teacher.recipe.epochs=1"]
CONF = Path(__file__).resolve().parents[1] / "conf"


def options(group):
    """The options of a config group as an `unknown ...` message lists them (every config in the folder)."""
    return ", ".join(sorted(p.stem for p in (CONF / group).glob("*.yaml")))


# process-wide state a subprocess starts afresh: urllib's opener keeps the proxies of its first use
IN_A_PROCESS = {"dataset-absent-offline", "cifar-absent-offline"}


def run_process(args, env, cwd):
    return subprocess.run([*KDRUN, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=300)


def run(args, env, cwd):
    """The CLI in this process (the same main(), stderr and exit code, a second not a process start)."""
    return kdrun_in_process(args, env=env, cwd=cwd)


def snapshot(root):
    """Every file with its size and mtime, and every folder (a folder's mtime moves when an empty
    folder is made and removed inside it, which harms nothing)."""
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) if p.is_file() else "folder" for p in Path(root).rglob("*")}


@pytest.fixture(scope="module")
def world(tmp_path_factory, data_dir, mlp30_teachers):
    """A workdir with a trained mlp30 teacher and its cache, and damaged files beside it."""
    import os

    root = tmp_path_factory.mktemp("bad_input")
    local_data = root / "data"  # inside root, so the snapshot covers it
    shutil.copytree(data_dir, local_data)
    offline = "http://127.0.0.1:9"  # a closed local port: any download fails at once, network or not
    env = {**os.environ, "KDRUN_WORKDIR": str(root / "work"), "KDRUN_DATA": str(local_data),
           "http_proxy": offline, "https_proxy": offline, "HTTP_PROXY": offline, "HTTPS_PROXY": offline}
    use_teachers(mlp30_teachers, root / "work")  # `kdrun train` of T30 on QUICK, trained once a session
    assert run(["soft-targets", *T30, *QUICK], env, root).returncode == 0
    teacher = next((root / "work" / "teachers").glob("*/model.pt"))
    cache = next((root / "work" / "soft_targets").glob("*/*.pt"))
    files = root / "files"
    files.mkdir()
    (files / "garbage.pt").write_text("not a checkpoint")
    (files / "truncated.pt").write_bytes(teacher.read_bytes()[: teacher.stat().st_size // 2])
    torch.save({"weights": torch.zeros(3)}, files / "foreign.pt")
    # a teacher trained on MNIST-shaped data: the wrong dataset for a Fashion-MNIST student
    mnist = root / "mnist_data"
    write_mnist_like(mnist / "MNIST" / "raw", n_train=100, n_test=50)
    menv = {**env, "KDRUN_WORKDIR": str(root / "mnist_work"), "KDRUN_DATA": str(mnist)}
    assert run(["train", *T30, "progress=false"], menv, root).returncode == 0
    shutil.copy(next((root / "mnist_work" / "teachers").glob("*/model.pt")), files / "mnist_teacher.pt")
    # a workdir whose soft-target cache is damaged
    shutil.copytree(root / "work", root / "work_bad_cache")
    bad_cache = root / "work_bad_cache" / cache.relative_to(root / "work")
    bad_cache.write_bytes(b"PK\x03\x04 truncated")
    # a data dir whose training labels are cut short
    bad_data = root / "bad_data" / "FashionMNIST" / "raw"
    shutil.copytree(local_data / "FashionMNIST" / "raw", bad_data)
    labels = bad_data / "train-labels-idx1-ubyte"
    labels.write_bytes(labels.read_bytes()[:-100])
    # a data dir whose test labels start with another file type's magic number
    magic_data = root / "magic_data" / "FashionMNIST" / "raw"
    shutil.copytree(local_data / "FashionMNIST" / "raw", magic_data)
    test_labels = magic_data / "t10k-labels-idx1-ubyte"
    test_labels.write_bytes(b"\x00\x00\x08\x03" + test_labels.read_bytes()[4:])
    # a foreign cache: a valid PyTorch file where the soft targets should be
    shutil.copytree(root / "work", root / "work_foreign_cache")
    torch.save({"weights": torch.zeros(3)}, root / "work_foreign_cache" / cache.relative_to(root / "work"))
    (root / "empty_data").mkdir()
    # a plain state_dict of another architecture (mlp300's) than the teacher= it is passed as
    torch.save(MLP([1, 28, 28], 10, [300, 300]).state_dict(), files / "plain_mlp300.pt")
    # image trees: one whose train/emu folder holds no image, one with a file that is no image
    for name in ("tree_empty_class", "tree_bad_image"):
        write_image_tree(root / name)
    for png in (root / "tree_empty_class" / "train" / "emu").iterdir():
        png.unlink()
    (root / "tree_bad_image" / "test" / "emu" / "1.png").write_bytes(b"not a png")
    return {"root": root, "env": env, "teacher": teacher, "files": files, "bad_cache": bad_cache,
            "bad_labels": labels, "bad_magic": test_labels,
            "foreign_cache": root / "work_foreign_cache" / cache.relative_to(root / "work")}


def write_image_tree(root):
    """root/{train,test}/{cat,dog,emu}/{0,1}.png: 8x8 RGB images."""
    from PIL import Image

    for split in ("train", "test"):
        for c in ("cat", "dog", "emu"):
            (root / split / c).mkdir(parents=True)
            for i in range(2):
                Image.new("RGB", (8, 8), (40 * i, 0, 0)).save(root / split / c / f"{i}.png")


TREE = ["train", "dataset=imagefolder", "dataset.num_classes=3"]
HEADLESS = ["~student.model", "+student.model={_target_:test_open_models.Headless}"]
D = "kdrun distill"
CASES = [
    # (id, args, expected stderr line: exact, or a regex when it holds a content key)
    ("alpha-high", ["distill", *T30, *QUICK, "alpha=1.5"], "kdrun: error: alpha must be in [0, 1], got 1.5"),
    ("alpha-negative", ["distill", *T30, *QUICK, "alpha=-0.1"], "kdrun: error: alpha must be in [0, 1], got -0.1"),
    ("alpha-text", ["distill", *T30, *QUICK, "alpha=abc"], "kdrun: error: alpha must be a number, got 'abc'"),
    ("T-zero", ["distill", *T30, *QUICK, "T=0"], "kdrun: error: T must be > 0, got 0"),
    ("T-negative", ["distill", *T30, *QUICK, "T=-2"], "kdrun: error: T must be > 0, got -2"),
    ("T-text", ["distill", *T30, *QUICK, "T=abc"], "kdrun: error: T must be a number, got 'abc'"),
    ("temperature-number", ["distill", *QUICK, "temperature=7"],
     "kdrun: error: temperature picks a schedule (anneal, constant); to set the value use T=7"),
    ("unknown-command", ["frobnicate"],
     "kdrun: error: unknown command 'frobnicate'; choose from: train, soft-targets, distill, pipeline, evaluate, specialists, "
     "self-distill, mutual, report, resume, models"),
    ("misspelt-command", ["distil"],
     "kdrun: error: unknown command 'distil' (did you mean distill?); choose from: train, soft-targets, distill, pipeline, evaluate, "
     "specialists, self-distill, mutual, report, resume, models"),
    ("report-without-paths", ["report"], "kdrun: error: the following arguments are required: paths"),
    ("report-missing-path", ["report", "{root}/nope"], "kdrun: error: no such file or folder: {root}/nope"),
    ("unknown-teacher", ["train", "teacher=mlp1201", *QUICK],
     f"kdrun: error: unknown teacher 'mlp1201' (did you mean mlp1200?); choose from: {options('teacher')}"),
    ("unknown-student", ["distill", "student=big", *QUICK],
     f"kdrun: error: unknown student 'big'; choose from: {options('student')}"),
    ("unknown-loss", ["distill", *QUICK, "loss=foo"],
     f"kdrun: error: unknown loss 'foo'; choose from: {options('loss')}"),
    ("unknown-dataset", ["distill", "dataset=imagenet"],
     "kdrun: error: unknown dataset 'imagenet' (did you mean imagefolder?); choose from: cifar10, cifar100, "
     "fashion_mnist, imagefolder, mnist, svhn"),
    ("unknown-dataset-near-miss", ["distill", "dataset=cifar"],
     "kdrun: error: unknown dataset 'cifar' (did you mean cifar10?); choose from: cifar10, cifar100, fashion_mnist, "
     "imagefolder, mnist, svhn"),
    ("unknown-key", ["distill", *QUICK, "foo=1"],
     f"kdrun: error: unknown key 'foo' for {D} (`{D} --help` lists the keys)"),
    ("unknown-nested-key", ["distill", *QUICK, "teacher.model.widht=3"],
     f"kdrun: error: unknown key 'teacher.model.widht' for {D} (`{D} --help` lists the keys)"),
    ("model-group", ["train", *QUICK, "model=cnn"],
     "kdrun: error: model is not chosen directly; use teacher=NAME or student=NAME"),
    ("unknown-flag", ["distill", "--bogus"], "kdrun: error: unrecognized arguments: --bogus"),
    ("epochs-negative", ["distill", *T30, *QUICK, "epochs=-1"],
     "kdrun: error: epochs must be an integer >= 1 or null, got -1"),
    ("epochs-text", ["train", *QUICK, "epochs=two"], "kdrun: error: epochs must be an integer >= 1 or null, got 'two'"),
    ("recipe-epochs-zero", ["train", *QUICK, "teacher.recipe.epochs=0"],
     "kdrun: error: teacher.recipe.epochs must be an integer >= 1, got 0"),
    ("lr-zero", ["distill", *T30, *QUICK, "lr=0"], "kdrun: error: lr must be > 0, got 0"),
    ("batch-size-zero", ["distill", *T30, *QUICK, "batch_size=0"],
     "kdrun: error: batch_size must be an integer >= 1 or null, got 0"),
    ("limit-negative", ["distill", *T30, *QUICK, "dataset.limit=-5"],
     "kdrun: error: dataset.limit must be an integer >= 1 or null, got -5"),
    ("test-limit-zero", ["distill", *T30, *QUICK, "dataset.test_limit=0"],
     "kdrun: error: dataset.test_limit must be an integer >= 1 or null, got 0"),
    ("hidden-zero", ["train", *QUICK, "teacher=mlp30", "teacher.model.hidden=[0]"],
     "kdrun: error: teacher.model.hidden must be a non-empty list of integers >= 1, got [0]"),
    ("dropout-high", ["train", *QUICK, "teacher.model.dropout_input=1.5"],
     "kdrun: error: teacher.model.dropout_input must be in [0, 1), got 1.5"),
    ("device-unknown", ["distill", *T30, *QUICK, "device=tpu"],
     "kdrun: error: device must be one of auto, cpu, cuda, mps, got 'tpu'"),
    ("sweep-without-m", ["distill", *T30, *QUICK, "T=1,2"],
     "kdrun: error: T=1,2 is a sweep; add -m to run it: kdrun ... -m T=1,2"),
    ("sweep-bad-point", ["distill", *T30, *QUICK, "-m", "alpha=0.5,1.5"],
     "kdrun: error: alpha must be in [0, 1], got 1.5"),
    ("missing-teacher", ["distill", "teacher=mlp300", *QUICK],
     r"kdrun: error: no trained teacher mlp300 for fashion_mnist with seed 0 and this recipe \(key [0-9a-f]{12}\); "
     r"train it with: kdrun train teacher=mlp300 dataset=fashion_mnist dataset\.limit=1000 "
     r"dataset\.test_limit=500 seed=0"),
    ("teacher-recipe-near-miss", ["distill", "teacher=mlp30", *QUICK],
     r"kdrun: error: no trained teacher mlp30 .*; or use the stored one trained with teacher\.recipe\.epochs=1 "
     r"by adding that to your command"),
    ("teacher-other-architecture", ["distill", *QUICK, "teacher=mlp300", "teacher_ckpt={teacher}"],
     "kdrun: error: teacher checkpoint {teacher} is mlp30 (hidden=[30, 30], dropout_input=0.0, dropout_hidden=0.0, "
     "max_norm=None), but teacher=mlp300 is (hidden=[300, 300], dropout_input=0.0, dropout_hidden=0.0, "
     "max_norm=None); pass teacher=mlp30"),
    ("teacher-other-dataset", ["distill", *T30, *QUICK, "teacher_ckpt={files}/mnist_teacher.pt"],
     "kdrun: error: teacher checkpoint {files}/mnist_teacher.pt was trained on mnist, not fashion_mnist"),
    ("teacher-ckpt-missing", ["distill", *T30, *QUICK, "teacher_ckpt={files}/nope.pt"],
     "kdrun: error: teacher checkpoint not found: {files}/nope.pt"),
    ("checkpoint-garbage", ["distill", *T30, *QUICK, "teacher_ckpt={files}/garbage.pt"],
     "kdrun: error: corrupt teacher checkpoint {files}/garbage.pt: not a PyTorch zip archive"),
    ("checkpoint-truncated", ["distill", *T30, *QUICK, "teacher_ckpt={files}/truncated.pt"],
     "kdrun: error: corrupt teacher checkpoint {files}/truncated.pt: not a PyTorch zip archive"),
    ("checkpoint-foreign", ["distill", *T30, *QUICK, "teacher_ckpt={files}/foreign.pt"],
     "kdrun: error: {files}/foreign.pt is not a kdrun model checkpoint"),
    ("cache-corrupt", ["distill", *T30, *QUICK, "workdir={root}/work_bad_cache"],
     "kdrun: error: corrupt soft-target cache {bad_cache}: not a PyTorch zip archive"),
    ("student-jitter-with-cache", ["distill", *T30, *QUICK, "student.recipe.jitter=2"],
     "kdrun: error: student.recipe.jitter must be 0 with cached soft targets: they are the teacher's outputs on "
     "unshifted inputs, and a shifted view would be paired with them (transfer.augment=true runs the teacher on "
     "the shifted view instead)"),
    ("transfer-class-out-of-range", ["distill", *T30, *QUICK, "transfer.exclude_classes=[12]"],
     "kdrun: error: transfer.exclude_classes has class 12, but fashion_mnist has classes 0..9"),
    ("transfer-class-text", ["distill", *T30, *QUICK, "transfer.only_classes=[seven]"],
     "kdrun: error: transfer.only_classes must be a list of class indices, got ['seven']"),
    ("transfer-class-twice", ["distill", *T30, *QUICK, "transfer.only_classes=[7,7]"],
     "kdrun: error: transfer.only_classes lists a class twice: [7, 7]"),
    ("transfer-both-filters", ["distill", *T30, *QUICK, "transfer.exclude_classes=[3]", "transfer.only_classes=[7]"],
     "kdrun: error: set transfer.exclude_classes or transfer.only_classes, not both"),
    ("transfer-every-class-out", ["distill", *T30, *QUICK, "transfer.exclude_classes=[0,1,2,3,4,5,6,7,8,9]"],
     "kdrun: error: transfer.exclude_classes leaves out every class of fashion_mnist"),
    ("transfer-fraction-zero", ["distill", *T30, *QUICK, "transfer.fraction=0"],
     "kdrun: error: transfer.fraction must be in (0, 1], got 0"),
    ("transfer-fraction-high", ["distill", *T30, *QUICK, "transfer.fraction=1.5"],
     "kdrun: error: transfer.fraction must be in (0, 1], got 1.5"),
    ("transfer-labels-text", ["distill", *T30, *QUICK, "transfer.labels=maybe"],
     "kdrun: error: transfer.labels must be true or false, got 'maybe'"),
    ("transfer-unlabeled-alpha", ["distill", *T30, *QUICK, "transfer.labels=false"],
     "kdrun: error: transfer.labels=false needs alpha=1 (the hard term needs labels), got alpha=0.9"),
    ("transfer-val-too-big", ["distill", *T30, *QUICK, "transfer.val_size=1000"],
     "kdrun: error: transfer.val_size (1000) must be smaller than the train split (1000)"),
    ("recipe-val-negative", ["train", *T30, *QUICK, "teacher.recipe.val_size=-1"],
     "kdrun: error: teacher.recipe.val_size must be an integer >= 0, got -1"),
    ("recipe-val-too-big", ["train", *T30, *QUICK, "teacher.recipe.val_size=1000"],
     "kdrun: error: teacher.recipe.val_size (1000) must be smaller than the examples it is carved from (1000)"),
    ("val-twice", ["distill", *T30, *QUICK, "transfer.val_size=100", "student.recipe.val_size=100"],
     "kdrun: error: set transfer.val_size or student.recipe.val_size, not both: a distilled student's validation "
     "split is transfer.val_size"),
    ("bias-without-val", ["distill", *T30, *QUICK, "transfer.exclude_classes=[3]", "transfer.bias_correction=true"],
     "kdrun: error: transfer.bias_correction=true needs transfer.val_size > 0: the shift is tuned on a validation "
     "split carved from the training data, never on the test set"),
    ("bias-without-classes", ["distill", *T30, *QUICK, "transfer.val_size=100", "transfer.bias_correction=true"],
     "kdrun: error: transfer.bias_correction=true needs transfer.exclude_classes or transfer.only_classes (the "
     "classes whose bias is shifted)"),
    ("augment-without-jitter", ["distill", *T30, *QUICK, "transfer.augment=true"],
     "kdrun: error: transfer.augment=true needs student.recipe.jitter > 0 (or flip): the teacher sees the student's "
     "jittered view, and without jitter that is the cached view"),
    ("augment-without-teacher", ["distill", *QUICK, "alpha=0", "transfer.augment=true", "student.recipe.jitter=1"],
     "kdrun: error: transfer.augment=true needs a teacher (alpha > 0)"),
    ("pipeline-run-bad-key", ["pipeline", *T30, *QUICK, "+pipeline.runs.extra=['foo=1']"],
     f"kdrun: error: pipeline.runs.extra: unknown key 'foo' for {D} (`{D} --help` lists the keys)"),
    ("pipeline-run-bad-value", ["pipeline", *T30, *QUICK, "+pipeline.runs.extra=['alpha=2']"],
     "kdrun: error: pipeline.runs.extra: alpha must be in [0, 1], got 2"),
    ("pipeline-run-unknown-teacher", ["pipeline", *T30, *QUICK, "+pipeline.runs.extra=['teacher=mlp3000']"],
     f"kdrun: error: pipeline.runs.extra: unknown teacher 'mlp3000' (did you mean mlp300?); choose from: {options('teacher')}"),
    ("pipeline-run-not-a-list", ["pipeline", *T30, *QUICK, "+pipeline.runs.extra=alpha"],
     "kdrun: error: pipeline.runs.extra must be a list of overrides like ['alpha=0', 'T=2,4'], got 'alpha'"),
    ("pipeline-run-reserved-name", ["pipeline", *T30, *QUICK, "+pipeline.runs.teacher=['alpha=0']"],
     "kdrun: error: pipeline.runs.teacher: a run cannot be named teacher or soft_targets"),
    ("pipeline-run-val-too-big", ["pipeline", *T30, *QUICK, "dataset.limit=null", "+pipeline.runs.extra=['transfer.val_size=60000']"],
     "kdrun: error: pipeline.runs.extra: transfer.val_size (60000) must be smaller than the train split (60000)"),
    ("ensemble-no-members", ["distill", *QUICK, "teacher=ensemble", "teacher.members=[]"],
     "kdrun: error: teacher.members must be a non-empty list (seeds, 'teacher=NAME seed=N' strings or model.pt "
     "paths), got []"),
    ("ensemble-combine-unknown", ["distill", *QUICK, "teacher=ensemble", "teacher.combine=median"],
     "kdrun: error: teacher.combine must be one of arithmetic, geometric, got 'median'"),
    ("ensemble-member-not-a-teacher", ["distill", *QUICK, "teacher=ensemble", "teacher.members=[0,'dataset=mnist']"],
     "kdrun: error: teacher.members[1]: 'dataset=mnist' does not name a stored teacher; use teacher=NAME, "
     "teacher.KEY=VALUE and seed=N"),
    ("ensemble-member-ensemble", ["train", *QUICK, "teacher=ensemble", "teacher.members=['teacher=ensemble']"],
     "kdrun: error: teacher.members[0]: a member cannot itself be an ensemble"),
    ("ensemble-member-bad-value", ["train", *QUICK, "teacher=ensemble", "teacher.members=['teacher.model.dropout_input=2']"],
     "kdrun: error: teacher.members[0].model.dropout_input must be in [0, 1), got 2"),
    ("ensemble-member-unknown", ["distill", *QUICK, "teacher=ensemble", "teacher.members=['teacher=mlp1201']"],
     f"kdrun: error: teacher.members[0]: unknown teacher 'mlp1201' (did you mean mlp1200?); choose from: "
     f"{options('teacher')}"),
    ("teacher-seed-word", ["distill", *QUICK, "teacher_seed=own"],
     "kdrun: error: teacher_seed must be an integer >= 0 or same (the run's own seed), got 'own'"),
    ("teacher-seed-same-missing", ["distill", "teacher=mlp300", *QUICK, "seed=3", "teacher_seed=same"],
     r"kdrun: error: no trained teacher mlp300 for fashion_mnist with seed 3 and this recipe \(key [0-9a-f]{12}\); "
     r"train it with: kdrun train teacher=mlp300 dataset=fashion_mnist dataset\.limit=1000 "
     r"dataset\.test_limit=500 seed=3"),
    ("ensemble-with-teacher-seed", ["distill", *QUICK, "teacher=ensemble", "teacher_seed=2"],
     "kdrun: error: teacher_seed and teacher_ckpt pick one teacher; an ensemble's are teacher.members"),
    ("ensemble-member-missing", ["distill", *QUICK, "teacher=ensemble", "teacher.member=mlp30", "teacher.recipe.epochs=1",
                                 "teacher.members=[0,1]"],
     r"kdrun: error: teacher\.members\[1\]: no trained teacher mlp30 for fashion_mnist with seed 1 and this recipe "
     r"\(key [0-9a-f]{12}\); train it with: kdrun train teacher=ensemble dataset=fashion_mnist dataset\.limit=1000 "
     r"dataset\.test_limit=500 teacher\.member=mlp30 teacher\.recipe\.epochs=1 'teacher\.members=\[0,1\]'"),
    ("ensemble-member-ckpt-other-dataset", ["distill", *QUICK, "teacher=ensemble",
                                            "teacher.members=['{files}/mnist_teacher.pt']"],
     "kdrun: error: teacher checkpoint {files}/mnist_teacher.pt was trained on mnist, not fashion_mnist"),
    ("evaluate-ckpt-missing", ["evaluate", *QUICK, "ckpt={files}/nope.pt"],
     "kdrun: error: checkpoint not found: {files}/nope.pt"),
    ("evaluate-ckpt-garbage", ["evaluate", *QUICK, "ckpt={files}/garbage.pt"],
     "kdrun: error: corrupt model checkpoint {files}/garbage.pt: not a PyTorch zip archive"),
    ("specialists-k-high", ["specialists", *QUICK, "specialists.k=11"],
     "kdrun: error: specialists.k must be at most the number of classes (10), got 11"),
    ("specialists-top-n-high", ["specialists", *QUICK, "specialists.top_n=12"],
     "kdrun: error: specialists.top_n must be at most the number of classes (10), got 12"),
    ("specialists-only-negative", ["specialists", *QUICK, "specialists.only=-1"],
     "kdrun: error: specialists.only must be an integer >= 0 or null, got -1"),
    ("specialists-epochs-zero", ["specialists", *QUICK, "specialists.recipe.epochs=0"],
     "kdrun: error: specialists.recipe.epochs must be an integer >= 1, got 0"),
    ("specialists-no-held-out", ["specialists", *QUICK, "transfer.val_size=0"],
     "kdrun: error: kdrun specialists needs transfer.val_size >= 10 (held-out examples whose generalist predictions "
     "are clustered), got 0"),
    ("specialists-held-out-too-big", ["specialists", *QUICK, "transfer.val_size=1000"],
     "kdrun: error: transfer.val_size (1000) must be smaller than the train split (1000)"),
    ("specialists-transfer-filter", ["specialists", *QUICK, "transfer.exclude_classes=[3]"],
     "kdrun: error: kdrun specialists uses transfer.val_size only; transfer.exclude_classes is for kdrun distill"),
    ("specialists-k-one", ["specialists", *QUICK, "specialists.k=1"],
     "kdrun: error: specialists.k must be an integer >= 2, got 1"),
    ("specialists-min-size-all", ["specialists", *QUICK, "specialists.min_size=10"],
     "kdrun: error: specialists.min_size must be at most 9 (a specialist needs a dustbin), got 10"),
    ("specialists-only-beyond-k", ["specialists", *QUICK, "specialists.k=3", "specialists.only=3"],
     "kdrun: error: specialists.only must be below specialists.k (3), got 3"),
    ("specialists-teacher-ckpt", ["specialists", *QUICK, "teacher_ckpt={teacher}"],
     "kdrun: error: kdrun specialists trains (or reuses) its own generalist; teacher_ckpt is not for it"),
    ("ensemble-member-seed-text", ["distill", *QUICK, "teacher=ensemble", "teacher.members=['seed=abc']"],
     "kdrun: error: teacher.members[0]: seed must be an integer >= 0, got 'abc'"),
    ("ensemble-member-seed-negative", ["distill", *QUICK, "teacher=ensemble", "teacher.members=[-1]"],
     "kdrun: error: teacher.members[0]: seed must be an integer >= 0, got -1"),
    ("specialists-ensemble", ["specialists", *QUICK, "teacher=ensemble"],
     "kdrun: error: kdrun specialists trains its own generalist: teacher= must name one model, not an ensemble"),
    ("unknown-experiment", ["pipeline", "experiment=hinton"],
     "kdrun: error: unknown experiment 'hinton' (did you mean hinton_mnist?); choose from: born_again, "
     "cifar100_resnet110_resnet32, cifar100_resnet32x4_resnet8x4, cifar100_resnet32x4_shufflenetv2, "
     "cifar100_resnet56_resnet20, cifar100_table, cifar100_vgg13_vgg8, cifar100_wrn_40_2_wrn_16_2, "
     "cifar100_wrn_40_2_wrn_40_1, cifar10_short, demo, ensemble_fashion, ensemble_mnist, "
     "hinton_fashion, hinton_mnist, methods_fashion, omit_class, only_classes, regulariser, self_teaching_fashion, "
     "specialists_fashion, "
     "student_size"),
    ("channels-zero", ["train", *QUICK, "teacher=cnn", "teacher.model.channels=[0]"],
     "kdrun: error: teacher.model.channels must be a non-empty list of integers >= 1, got [0]"),
    ("weight-decay-negative", ["train", *QUICK, "teacher.recipe.optimizer.weight_decay=-1"],
     "kdrun: error: invalid teacher config: Invalid weight_decay value: -1"),
    ("lr-schedule-unknown", ["distill", *T30, *QUICK, "student.recipe.scheduler.kind=stairs"],
     "kdrun: error: invalid student config: lr schedule must be one of cosine, constant, step, got 'stairs'"),
    ("lr-milestones-unordered", ["distill", *T30, *QUICK, "student.recipe.scheduler.kind=step",
                                 "+student.recipe.scheduler.milestones=[0.75,0.5]"],
     "kdrun: error: invalid student config: lr milestones must be increasing fractions of training in (0, 1), "
     "got [0.75, 0.5]"),
    ("anneal-shape-unknown", ["distill", *T30, *QUICK, "temperature=anneal", "temperature.shape=zigzag"],
     "kdrun: error: invalid loss config: anneal shape must be linear or cosine, got 'zigzag'"),
    ("alpha-anneal-start-high", ["distill", *T30, *QUICK, "alpha=anneal", "alpha_schedule.start=2"],
     "kdrun: error: alpha_schedule.start must be in [0, 1], got 2"),
    ("subset-seed-negative", ["distill", *T30, *QUICK, "dataset.subset_seed=-3"],
     "kdrun: error: dataset.subset_seed must be an integer >= 0, got -3"),
    ("dataset-absent-offline", ["train", "dataset=mnist", "data_dir={root}/empty_data"],
     "kdrun: error: dataset mnist not found in {root}/empty_data/MNIST/raw, torchvision download (failed or offline); "
     "try dataset=fashion_mnist (Debian's dataset-fashion-mnist package)"),
    # self-distillation, mutual learning, born-again chains, augmentation
    ("mutual-one-student", ["mutual", *QUICK, "mutual.students=1"],
     "kdrun: error: mutual.students must be an integer >= 2, got 1"),
    ("mutual-negative-weight", ["mutual", *QUICK, "loss.weight=-1"],
     "kdrun: error: invalid loss config: weight must be >= 0, got -1"),
    ("self-distill-negative-lambda", ["self-distill", *QUICK, "loss.lam=-1"],
     "kdrun: error: invalid loss config: lam and mu must be >= 0, got lam=-1, mu=0.0005"),
    ("self-distill-unknown-kernel", ["self-distill", *QUICK, "loss.mmd_kernel=cosine"],
     "kdrun: error: invalid loss config: mmd kernel must be linear or gaussian, got 'cosine'"),
    ("self-distill-erase-above-1", ["self-distill", *QUICK, "loss.distortions.erase=2"],
     "kdrun: error: invalid loss config: erase must be in [0, 1], got 2"),
    ("flip-not-boolean", ["distill", *T30, *QUICK, "student.recipe.flip=maybe"],
     "kdrun: error: student.recipe.flip must be true or false, got 'maybe'"),
    ("flip-with-cached-targets", ["distill", *T30, *QUICK, "student.recipe.flip=true"],
     "kdrun: error: student.recipe.flip must be false with cached soft targets: they are the teacher's outputs on "
     "unflipped inputs (transfer.augment=true runs the teacher on the student's view)"),
    ("pipeline-run-unknown-command", ["pipeline", *T30, *QUICK, "+pipeline.runs.extra=[selfdistill]"],
     "kdrun: error: pipeline.runs.extra: 'selfdistill' is not a command a run can be (did you mean self-distill?); "
     "choose from: distill, self-distill, mutual"),
    ("pipeline-reference-unknown", ["pipeline", *T30, *QUICK, "+pipeline.runs.extra=['teacher_ckpt=@nope']"],
     "kdrun: error: pipeline.runs.extra: teacher_ckpt=@nope names no earlier run (earlier: student_alone, distilled)"),
    ("pipeline-reference-other-seed", ["pipeline", *T30, *QUICK, "+pipeline.runs.extra=['teacher_ckpt=@distilled','seed=3']"],
     "kdrun: error: pipeline.runs.extra: teacher_ckpt=@distilled: distilled has no job with seed 3 (it has 0); a job "
     "distils from the same seed's model"),
    ("pipeline-reference-mutual", ["pipeline", *T30, *QUICK, "+pipeline.runs.m=[mutual]", "+pipeline.runs.x=['teacher_ckpt=@m']"],
     "kdrun: error: pipeline.runs.x: teacher_ckpt=@m: m is a mutual run, with one model per student; name a model.pt instead"),
    ("pipeline-ensemble-other-seeds", ["pipeline", *T30, *QUICK, "+pipeline.runs.x=['alpha=0','seed=0,1']",
                                       "+pipeline.ensembles.e=[x,distilled]"],
     "kdrun: error: pipeline.ensembles.e: its runs have different seeds; they pair up seed by seed"),
    ("pipeline-compare-not-a-pair", ["pipeline", *T30, *QUICK, "pipeline.compare=[[distilled]]"],
     "kdrun: error: pipeline.compare[0] must be a pair of row selectors like [distilled, student_alone], got ['distilled']"),
    ("pipeline-compare-unknown-run", ["pipeline", *T30, *QUICK, "pipeline.compare=[[distiled,student_alone]]"],
     "kdrun: error: pipeline.compare[0]: 'distiled' names no run of this pipeline (runs: student_alone, distilled)"),
    ("ensemble-held-out-negative", ["distill", *QUICK, "teacher=ensemble", "teacher.recipe.val_size=-5"],
     "kdrun: error: teacher.recipe.val_size must be an integer >= 0 or null, got -5"),
    ("ensemble-held-out-everything", ["train", *QUICK, "teacher=ensemble", "teacher.recipe.val_size=1000"],
     "kdrun: error: teacher.recipe.val_size (1000) must be smaller than the examples it is carved from (1000)"),
    ("ensemble-member-held-out-everything", ["train", *QUICK, "teacher=ensemble",
                                            "teacher.members=['seed=0 teacher.recipe.val_size=1000']"],
     "kdrun: error: teacher.members[0]: teacher.recipe.val_size (1000) must be smaller than the examples it is carved "
     "from (1000)"),
    ("self-distill-bandwidth-zero", ["self-distill", *QUICK, "loss.bandwidth=0"],
     "kdrun: error: invalid loss config: bandwidth must be a number > 0 or null, got 0"),
    ("mutual-without-labels", ["mutual", *QUICK, "transfer.labels=false"],
     "kdrun: error: transfer.labels=false is for kdrun distill; kdrun mutual trains on labels, with no teacher"),
    ("dataset-std-zero", ["train", *QUICK, "dataset.std=0"], "kdrun: error: dataset.std must be > 0, got 0"),
    ("pipeline-ensemble-of-one", ["pipeline", *T30, *QUICK, "+pipeline.ensembles.e=[distilled]"],
     "kdrun: error: pipeline.ensembles.e must list 2 or more runs of pipeline.runs (student_alone, distilled), got ['distilled']"),
    ("dataset-mean-per-channel-mismatch", ["train", *QUICK, "dataset.mean=[0.1,0.2,0.3]"],
     "kdrun: error: dataset.mean must be one number or one per channel (1), got [0.1, 0.2, 0.3]"),
    ("cifar-absent-offline", ["train", "dataset=cifar10", "teacher=resnet20", "data_dir={root}/empty_data"],
     "kdrun: error: dataset cifar10 not found in {root}/empty_data/cifar-10-batches-py, torchvision download (failed or "
     "offline); try dataset=fashion_mnist (Debian's dataset-fashion-mnist package)"),
    ("lr-text", ["distill", *T30, *QUICK, "lr=abc"], "kdrun: error: lr must be a number, got 'abc'"),
    ("batch-size-text", ["distill", *T30, *QUICK, "batch_size=abc"],
     "kdrun: error: batch_size must be an integer >= 1 or null, got 'abc'"),
    ("epochs-fraction", ["train", *QUICK, "epochs=1.5"], "kdrun: error: epochs must be an integer >= 1 or null, got 1.5"),
    ("limit-text", ["distill", *T30, *QUICK, "dataset.limit=abc"],
     "kdrun: error: dataset.limit must be an integer >= 1 or null, got 'abc'"),
    ("dropout-text", ["train", *QUICK, "teacher.model.dropout_hidden=abc"],
     "kdrun: error: teacher.model.dropout_hidden must be a number, got 'abc'"),
    ("only-classes-empty-value", ["distill", *T30, *QUICK, "transfer.only_classes="],
     "kdrun: error: transfer.only_classes must be a list of class indices, got ''"),
    ("only-classes-by-name", ["distill", *T30, *QUICK, "transfer.only_classes=[Coat]"],
     "kdrun: error: transfer.only_classes must be a list of class indices, got ['Coat']"),
    ("only-classes-unknown", ["distill", *T30, *QUICK, "transfer.only_classes=[99]"],
     "kdrun: error: transfer.only_classes has class 99, but fashion_mnist has classes 0..9"),
    ("hidden-empty", ["train", *QUICK, "teacher.model.hidden=[]"],
     "kdrun: error: teacher.model.hidden must be a non-empty list of integers >= 1, got []"),
    ("idx-wrong-magic", ["train", *QUICK, "data_dir={root}/magic_data"],
     "kdrun: error: corrupt IDX file {bad_magic}: bad magic 00000803, expected 00000801"),
    ("cache-foreign", ["distill", *T30, *QUICK, "workdir={root}/work_foreign_cache"],
     "kdrun: error: corrupt soft-target cache {foreign_cache}: not a soft-target cache; delete it to recompute"),
    ("resume-not-a-run", ["resume", "{root}/empty_data"],
     "kdrun: error: {root}/empty_data is not a kdrun run or sweep directory (it has no .hydra/config.yaml or multirun.yaml)"),
    ("resume-nothing", ["resume"], "kdrun: error: usage: kdrun resume RUN_DIR|SWEEP_DIR"),
    ("resume-two-dirs", ["resume", "{root}", "{root}"], "kdrun: error: usage: kdrun resume RUN_DIR|SWEEP_DIR"),
    ("resume-as-a-key", ["distill", *QUICK, "resume=yes"], "kdrun: error: resume must be true or false, got 'yes'"),
    # fused sweeps
    ("fused-list-without-flag", ["distill", *T30, *QUICK, "T=[2,5]"],
     "kdrun: error: T=[2, 5] is a list: train its values together with sweep.fused=true, or one after another with -m T=2,5"),
    ("fused-seed-list", ["distill", *T30, *QUICK, "sweep.fused=true", "T=[2,5]", "seed=[0,1]"],
     "kdrun: error: sweep.fused=true trains students that differ in T or alpha (one data order, one initialisation); "
     "sweep seeds with -m seed=0,1"),
    ("fused-not-boolean", ["distill", *T30, *QUICK, "sweep.fused=yes"],
     "kdrun: error: sweep.fused must be true or false, got 'yes'"),
    ("fused-dropout", ["distill", *T30, *QUICK, "sweep.fused=true", "T=[2,5]", "student.model.dropout_hidden=0.5"],
     "kdrun: error: sweep.fused=true needs a student without dropout (mlp800 has it): fused students cannot draw the "
     "masks or keep the statistics their own runs would; sweep with -m"),
    ("fused-bad-point", ["distill", *T30, *QUICK, "sweep.fused=true", "T=[2,-1]"], "kdrun: error: T must be > 0, got -1"),
    ("fused-empty", ["distill", *T30, *QUICK, "sweep.fused=true", "T=[]"], "kdrun: error: T=[] lists no values"),
    ("precision-unknown", ["distill", *T30, *QUICK, "precision=fp16"],
     "kdrun: error: precision must be one of fp32, bf16, got 'fp16'"),
    ("recipe-precision-unknown", ["train", *QUICK, "teacher.recipe.precision=half"],
     "kdrun: error: teacher.recipe.precision must be one of fp32, bf16, got 'half'"),
    ("compile-not-boolean", ["distill", *T30, *QUICK, "compile=maybe"],
     "kdrun: error: compile must be true or false, got 'maybe'"),
    ("reader-unknown", ["train", "dataset=mnist", "dataset.reader._target_=nope.Reader"],
     "kdrun: error: dataset.reader: unknown reader 'nope.Reader' (not importable)"),
    ("imagefolder-missing", [*TREE, "dataset.root={root}/no_such_tree"],
     "kdrun: error: ImageFolder: folder {root}/no_such_tree not found"),
    ("imagefolder-empty-class", [*TREE, "dataset.root={root}/tree_empty_class"],
     "kdrun: error: ImageFolder: {root}/tree_empty_class/train/emu has no images (.bmp, .jpeg, .jpg, .pgm, .png, "
     ".ppm, .tif, .tiff, .webp)"),
    ("checkpoint-other-architecture", ["distill", *T30, *QUICK, "teacher_ckpt={files}/plain_mlp300.pt"],
     "kdrun: error: teacher checkpoint {files}/plain_mlp300.pt is a state_dict that does not fit teacher=mlp30: "
     "body.2.weight is [300, 784] there, [30, 784] in mlp30"),
    ("model-lacks-head", ["self-distill", *QUICK, *HEADLESS],
     "kdrun: error: kdrun self-distill (its penultimate features, the head's input) needs the model's final "
     "nn.Linear layer (its head), but Headless has no nn.Linear layer to serve as its head (name one with head: in "
     "the model config)"),
    ("idx-truncated", ["train", *QUICK, "data_dir={root}/bad_data"],
     "kdrun: error: corrupt IDX file {bad_labels}: expected 60008 bytes for shape [60000], found 59908"),
]


@pytest.mark.parametrize("args,expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_nonzero_and_harmless(world, args, expected, request, runner=None):
    fill = {k: str(v) for k, v in world.items() if k != "env"}
    args = [re.sub(r"\{(\w+)\}", lambda m: fill.get(m.group(1), m.group(0)), a) for a in args]  # {root}, ...
    expected = expected.format(**fill) if "{" in expected and "\\" not in expected else expected
    if runner is None:
        runner = run_process if request.node.callspec.id in IN_A_PROCESS else run
    before = snapshot(world["root"])  # workdirs, data dirs and the cwd
    proc = runner(args, world["env"], world["root"])
    lines = proc.stderr.splitlines()
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    if "\\" in expected:
        assert re.fullmatch(expected, lines[0]), lines[0]
    else:
        assert lines[0] == expected
    assert proc.stdout == ""
    assert snapshot(world["root"]) == before  # nothing created, changed or removed


# the same checks through `python -m kdrun` in its own process, for a case of each kind of check
IN_SUBPROCESS_TOO = ["alpha-high", "unknown-command", "unknown-flag", "unknown-key", "report-missing-path",
                     "missing-teacher", "checkpoint-truncated", "cache-corrupt", "idx-truncated", "resume-not-a-run",
                     "pipeline-run-bad-value", "specialists-k-high"]


@pytest.mark.slow
@pytest.mark.parametrize("case", IN_SUBPROCESS_TOO)
def test_bad_input_in_its_own_process(world, case, request):
    _, args, expected = next(c for c in CASES if c[0] == case)
    test_bad_input_is_one_line_nonzero_and_harmless(world, args, expected, request, runner=run_process)


def test_an_unreadable_image_is_one_error_line_after_the_decoding_line_and_harmless(world):
    """Checking an image tree decodes it (the cache is written only when every image reads), so the error
    line may follow the line that says the decoding started."""
    tree = world["root"] / "tree_bad_image"
    before = snapshot(world["root"])
    proc = run([*TREE, f"dataset.root={tree}"], world["env"], world["root"])
    lines = proc.stderr.splitlines()
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and proc.stdout == ""
    assert lines[-1] == (f"kdrun: error: ImageFolder: cannot read image {tree}/test/emu/1.png: cannot identify image "
                         f"file '{tree}/test/emu/1.png'")
    assert all(re.fullmatch(rf"\[\d\d:\d\d:\d\d\] {re.escape(str(tree))}/test: decoding 6 images .*", line) for line in lines[:-1])
    assert snapshot(world["root"]) == before


def test_cuda_requested_without_cuda(world):
    env = {**world["env"], "CUDA_VISIBLE_DEVICES": ""}  # no visible GPU, on any machine
    proc = run_process(["distill", *T30, *QUICK, "device=cuda"], env, world["root"])
    assert proc.returncode == 2
    assert proc.stderr.strip() == "kdrun: error: device=cuda but CUDA is not available here; use device=cpu or device=auto"


SHORT = {" ".join(QUICK): "$Q", " ".join(T30): "$T30"}
README_TABLE = ("<!-- bad-input table: tests/test_bad_input.py -->", "<!-- end of bad-input table -->")


def readme_row(case):
    """A case as the table in docs/reliability.md shows it: `$Q`/`$T30` for the common words, `$ROOT`-style placeholders
    for the files the `world` fixture makes."""
    name, args, expected = case
    command = " ".join(["kdrun", *args])
    for words, short in SHORT.items():
        command = command.replace(words, short)
    shown = [re.sub(r"\{(\w+)\}", lambda m: "$" + m.group(1).upper(), text) for text in (command, expected)]
    return f"| {name} | {_code(shown[0])} | {_code(shown[1])} | 2 |"


def _code(text):
    """A markdown table cell in code font: `|` escaped, and double backticks when the text has one."""
    text = text.replace("|", "\\|")
    return f"`` {text} ``" if "`" in text else f"`{text}`"


def test_docs_bad_input_table_rows_are_tested_cases():
    text = (Path(__file__).parents[1] / "docs" / "reliability.md").read_text()
    start, end = (text.index(marker) for marker in README_TABLE)
    rows = [line for line in text[start:end].splitlines() if line.startswith("| ") and not line.startswith("| case")]
    by_name = {case[0]: readme_row(case) for case in CASES}
    assert len(rows) >= 30
    for row in rows:
        name = row.split(" | ")[0][2:]
        assert row == by_name.get(name), row


# under torchrun (its environment, simulated: the refusal comes before any process joins a group)
TORCHRUN_CASES = [
    ("torchrun-train", ["train", *T30, *QUICK],
     "kdrun: error: kdrun train does not run under torchrun (only kdrun distill does); run it as one process"),
    ("torchrun-sweep", ["distill", *T30, *QUICK, "-m", "seed=0,1"],
     "kdrun: error: -m (a sweep) does not run under torchrun; start one torchrun per point of the sweep"),
    ("torchrun-resume-key", ["distill", *T30, *QUICK, "resume=true"],
     "kdrun: error: resume=true does not run under torchrun; resume the run as one process: kdrun resume RUN_DIR"),
    ("torchrun-resume", ["resume", "{root}"],
     "kdrun: error: kdrun resume does not run under torchrun (only kdrun distill does); run it as one process"),
    ("torchrun-report", ["report", "{root}"],
     "kdrun: error: kdrun report does not run under torchrun (only kdrun distill does); run it as one process"),
]


@pytest.mark.parametrize("args,expected", [c[1:] for c in TORCHRUN_CASES], ids=[c[0] for c in TORCHRUN_CASES])
def test_what_cannot_run_under_torchrun_is_refused(world, args, expected, request):
    torchrun = {**world["env"], "WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"}
    test_bad_input_is_one_line_nonzero_and_harmless({**world, "env": torchrun}, args, expected, request)
