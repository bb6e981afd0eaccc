"""The user's own config folders (--config-dir, KDRUN_CONFIG_PATH, hydra.searchpath) compose with
kdrun's groups, and kdrun's option lists (its checks, "did you mean", --help, completion) include them."""

import os
import subprocess

import pytest
import yaml

from conftest import KDRUN, QUICK
from kdrun import cli, configs
from kdrun.errors import KdrunError

MYNET = """\
# a student of the user's: kdrun's recipe, the user's model (both groups composed together)
defaults:
  - /model@model: tiny16
  - /recipe@recipe: adam
  - _self_
name: mynet
"""
TINY16 = """\
_target_: kdrun.models.MLP
in_shape: ${dataset.shape}
hidden: [16]
dropout_input: 0.0
dropout_hidden: 0.0
max_norm: null
"""


@pytest.fixture
def my_conf(tmp_path, monkeypatch):
    monkeypatch.delenv(configs.ENV, raising=False)
    folder = tmp_path / "my_conf"
    (folder / "student").mkdir(parents=True)
    (folder / "model").mkdir()
    (folder / "student" / "mynet.yaml").write_text(MYNET)
    (folder / "model" / "tiny16.yaml").write_text(TINY16)
    yield folder
    configs.use([])  # the next test starts with kdrun's folder only


def kdrun_here(capsys, *argv):
    """cli.main in this process: (exit code, stdout, stderr)."""
    with pytest.raises(SystemExit) as exit_:
        cli.main(list(argv))
    out = capsys.readouterr()
    return exit_.value.code, out.out, out.err


@pytest.mark.parametrize("how", ["--config-dir", "-cd", "KDRUN_CONFIG_PATH", "hydra.searchpath"])
def test_a_student_of_my_folder_composes_with_kdruns_groups(my_conf, capsys, monkeypatch, how):
    words = {"--config-dir": ["--config-dir", str(my_conf)], "-cd": ["-cd", str(my_conf)],
             "hydra.searchpath": [f"hydra.searchpath=[file://{my_conf}]"], "KDRUN_CONFIG_PATH": []}[how]
    if how == "KDRUN_CONFIG_PATH":
        monkeypatch.setenv(configs.ENV, os.pathsep.join([str(my_conf.parent / "elsewhere_unused"), str(my_conf)]))
        (my_conf.parent / "elsewhere_unused").mkdir()
    code, out, err = kdrun_here(capsys, "distill", *words, "student=mynet", "--cfg", "job")
    assert code == 0, err
    student = yaml.safe_load(out)["student"]
    assert student["name"] == "mynet" and student["model"]["hidden"] == [16]
    assert student["recipe"]["optimizer"]["_target_"] == "torch.optim.AdamW"  # kdrun's recipe=adam


def test_the_option_lists_hold_my_folders_options(my_conf, monkeypatch):
    other = my_conf.parent / "more"
    (other / "teacher").mkdir(parents=True)
    (other / "teacher" / "myteacher.yaml").write_text("name: myteacher\n")
    monkeypatch.setenv(configs.ENV, f"{my_conf}{os.pathsep}{other}")
    configs.use(configs.from_env())
    assert "mynet" in configs.group_options("student") and "mlp30" in configs.group_options("student")
    assert "myteacher" in configs.group_options("teacher") and "tiny16" in configs.group_options("model")
    assert configs.option_file("student", "mynet") == my_conf / "student" / "mynet.yaml"
    configs.use([])
    assert "mynet" not in configs.group_options("student")


def test_a_typo_of_my_option_gets_did_you_mean(my_conf, capsys):
    code, _, err = kdrun_here(capsys, "distill", "--config-dir", str(my_conf), "student=mynett")
    assert code == 2
    line = err.strip().splitlines()[-1]
    assert line.startswith("kdrun: error: unknown student 'mynett' (did you mean mynet?); choose from: cnn, ")
    assert ", mynet, " in line
    code, _, err = kdrun_here(capsys, "distill", "--config-dir", str(my_conf), "student=mynett", "--cfg", "job")
    assert err.strip().splitlines()[-1].startswith("kdrun: error: unknown student 'mynett' (did you mean mynet?)")


def test_help_lists_my_options(my_conf, capsys):
    code, out, _ = kdrun_here(capsys, "distill", "--config-dir", str(my_conf), "--help")
    assert code == 0
    student = next(line for line in out.splitlines() if line.startswith("student: "))
    model = next(line for line in out.splitlines() if line.startswith("model: "))
    assert "mynet" in student.split(": ")[1].split(", ") and "tiny16" in model


def test_a_missing_folder_or_a_name_of_kdruns_is_refused(my_conf, capsys):
    code, _, err = kdrun_here(capsys, "distill", "--config-dir", str(my_conf / "nope"), "--cfg", "job")
    assert (code, err.strip()) == (2, f"kdrun: error: config folder not found: {my_conf / 'nope'}")
    (my_conf / "student" / "mlp30.yaml").write_text(MYNET)
    with pytest.raises(KdrunError, match=f"^{my_conf}/student/mlp30.yaml has the name of kdrun's own student option; "
                                         "give it another name$"):
        configs.use([str(my_conf)])


@pytest.mark.slow
def test_a_run_and_tab_completion_with_my_folder(my_conf, kdrun, workdir, env, tmp_path):
    kdrun("distill", "--config-dir", str(my_conf), "student=mynet", "alpha=0", "epochs=1", *QUICK[:1],
          "dataset.limit=300", "dataset.test_limit=100", "progress=false")
    run = next((workdir / "runs" / "distill").iterdir())
    assert (run / "results.json").is_file() and '"student": "mynet"' in (run / "results.json").read_text()
    # resumed without naming the folder: the run's .hydra/hydra.yaml recorded it
    (run / "results.json").unlink()
    kdrun("resume", str(run))
    assert '"student": "mynet"' in (run / "results.json").read_text()
    line = "kdrun distill student=my"
    proc = subprocess.run([*KDRUN, "-sc", "query=bash"], env={**env, "COMP_LINE": line, configs.ENV: str(my_conf)},
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.stdout.split() == ["student=mynet"]
