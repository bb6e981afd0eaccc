"""The teacher store's key: what changes a trained teacher changes the key (its config, its recipe, its
data files); naming its parts does not."""

import json

import pytest
from hydra import compose, initialize_config_dir

from conftest import kdrun_in_process, write_cifar_like, write_mnist_like
from kdrun.cli import conf_dir
from kdrun.parts import DataPart, TeacherSource
from kdrun.store import missing_teacher_message, teacher_identity, teacher_key
from test_units import DATA


def keys(*override_lists):
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        return [teacher_key(compose("train", overrides=["teacher=cnn", *o]), 0, DATA) for o in override_lists]


def test_stage_names_and_head_path_leave_the_key_alone_but_the_architecture_does_not():
    plain, renamed, head, wider = keys([], ["~teacher.model.features", "+teacher.model.features={x: body}"],
                                       ["+teacher.model.head=head"], ["teacher.model.fc=128"])
    assert plain == renamed == head
    assert wider != plain


def test_the_inputs_normalisation_is_part_of_the_key():
    """A teacher sees its inputs normalised by dataset.mean/std: other statistics, another teacher."""
    plain, mean, std, auto = keys([], ["dataset.mean=0.5"], ["dataset.std=0.5"], ["dataset.mean=auto", "dataset.std=auto"])
    assert len({plain, mean, std, auto}) == 4


def train_config(data_dir, dataset="mnist"):
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        return compose("train", overrides=["teacher=mlp30", f"dataset={dataset}", f"data_dir={data_dir}"])


def change_one_byte(path):
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


def test_a_changed_idx_file_is_a_new_key_and_the_same_bytes_rewritten_are_the_same_key(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    write_mnist_like(raw)
    cfg = train_config(tmp_path)
    before = teacher_key(cfg, 0)
    # what a command computes: the data part's identity, once, handed to the teacher's source
    assert TeacherSource.of(cfg, DataPart.of(cfg).identity, seed=0).key == before
    write_mnist_like(raw)  # the same bytes written again: a new mtime, the same content
    assert teacher_key(cfg, 0) == before
    change_one_byte(raw / "train-images-idx3-ubyte")
    assert teacher_key(cfg, 0) != before
    write_mnist_like(raw)
    assert teacher_key(cfg, 0) == before
    change_one_byte(raw / "t10k-images-idx3-ubyte")  # the test split trains nothing: the same teacher
    assert teacher_key(cfg, 0) == before


def test_a_changed_cifar_batch_is_a_new_key(tmp_path):
    write_cifar_like(tmp_path / "cifar-10-batches-py")
    cfg = train_config(tmp_path, "cifar10")
    before = teacher_key(cfg, 0)
    write_cifar_like(tmp_path / "cifar-10-batches-py", seed=1)
    assert teacher_key(cfg, 0) != before
    write_cifar_like(tmp_path / "cifar-10-batches-py")
    assert teacher_key(cfg, 0) == before


def test_a_teacher_stored_without_its_data_hashes_is_named_and_not_reused(tmp_path):
    cfg = train_config(tmp_path)
    wanted = teacher_identity(cfg, 0, DATA)
    old = json.loads(json.dumps(wanted))
    del old["dataset"]["files"]
    entry = tmp_path / "teachers" / "0123abcd"
    entry.mkdir(parents=True)
    (entry / "teacher.json").write_text(json.dumps({"identity": old}))
    message = missing_teacher_message(wanted, tmp_path, "kdrun train teacher=mlp30")
    assert message.endswith("train it with: kdrun train teacher=mlp30; the stored teacher 0123abcd has this "
                            "config but records no hashes of its data files, so it is not reused")
    other = json.loads(json.dumps(wanted))
    other["dataset"]["files"] = {"train-images-idx3-ubyte": "f" * 16}
    (entry / "teacher.json").write_text(json.dumps({"identity": other}))  # another copy of the data
    assert missing_teacher_message(wanted, tmp_path, "kdrun train teacher=mlp30").endswith(
        "train it with: kdrun train teacher=mlp30")


@pytest.mark.slow  # trains three times (about 5 s)
def test_kdrun_train_reuses_the_teacher_of_unchanged_files_and_trains_anew_for_a_changed_one(tmp_path):
    import os

    data = tmp_path / "data"
    write_mnist_like(data / "MNIST" / "raw")
    env = {**os.environ, "KDRUN_WORKDIR": str(tmp_path / "work"), "KDRUN_DATA": str(data)}
    args = ["train", "teacher=mlp30", "teacher.recipe.epochs=1", "dataset=mnist", "progress=false", "device=cpu"]

    def train(name):
        proc = kdrun_in_process([*args, f"hydra.run.dir={tmp_path / name}"], env=env, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr[-2000:]
        return json.loads((tmp_path / name / "results.json").read_text())

    first, again = train("first"), train("again")
    assert (first["status"], again["status"]) == ("completed", "reused")
    assert again["teacher_key"] == first["teacher_key"]
    change_one_byte(data / "MNIST" / "raw" / "train-images-idx3-ubyte")
    changed = train("changed")
    assert changed["status"] == "completed" and changed["teacher_key"] != first["teacher_key"]
    assert len(list((tmp_path / "work" / "teachers").glob("*/model.pt"))) == 2
