"""Property: whatever words reach the dispatcher, kdrun either accepts them (and would run) or says
why in one `kdrun: error:` line with exit 2: never a traceback, never an internal error.

The dispatcher runs in-process with Hydra's run replaced by a recorder, so each example costs the
checks (parse, compose every job, validate, preflight) and no training."""

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from kdrun import cli

COMMANDS = ["train", "distill", "soft-targets", "self-distill", "mutual", "evaluate", "specialists", "pipeline",
            "report", "resume", "distil"]
KEYS = ["T", "alpha", "epochs", "lr", "batch_size", "seed", "teacher_seed", "device", "progress", "retrain",
        "dataset.limit", "dataset.test_limit", "transfer.fraction", "transfer.exclude_classes",
        "transfer.only_classes", "transfer.val_size", "transfer.labels", "student.model.hidden",
        "student.model.dropout", "teacher.recipe.epochs", "loss.lam", "mutual.students", "teacher", "student",
        "dataset", "temperature", "alpha_schedule", "loss", "model", "foo", "hydra.job.chdir", "+extra", "~T"]
VALUES = st.one_of(
    st.integers(-5, 70000).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(str),
    st.sampled_from(["", "abc", "null", "true", "[]", "[1,2]", "[0,99]", "[a]", "1,2", "${oc.env:HOME}", "'x'",
                     "[800,0]", "cnn", "mlp800", "fashion_mnist", "anneal", "cpu", "cuda", "7", "1e-3", "[", "}",
                     "=", "a=b", "glob(*)", "range(1,3)"]),
    st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=12),
)
KEY_VALUE = st.builds(lambda k, v: f"{k}={v}", st.sampled_from(KEYS), VALUES)
OVERRIDE = st.one_of(KEY_VALUE, KEY_VALUE, KEY_VALUE, st.text(max_size=20),  # mostly well-formed, to get past the parser
                     st.sampled_from(["-m", "--cfg", "job", "--help", "-x", "--", "dataset=fashion_mnist"]))


@pytest.fixture
def dispatcher(monkeypatch, tmp_path, data_dir):
    monkeypatch.setenv("KDRUN_WORKDIR", str(tmp_path / "work"))
    monkeypatch.setenv("KDRUN_DATA", str(data_dir))
    monkeypatch.delenv("KDRUN_DEBUG", raising=False)
    ran = []
    monkeypatch.setattr(cli, "run_hydra", lambda command, argv: ran.append((command, argv)))
    monkeypatch.setattr("kdrun.report.main", lambda argv: 0)  # it writes where it is pointed: tested in test_report.py
    monkeypatch.chdir(tmp_path)
    return ran


@settings(max_examples=300, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(command=st.one_of(st.sampled_from(COMMANDS), st.sampled_from(COMMANDS), st.text(min_size=1, max_size=10)),
       words=st.lists(OVERRIDE, max_size=4))
def test_any_command_line_succeeds_or_fails_in_one_line(dispatcher, capsys, command, words):
    argv = [command, *words]
    with pytest.raises(SystemExit) as ended:
        cli.main(argv)
    out, err = capsys.readouterr()
    code = ended.value.code
    assert "Traceback" not in err
    event(f"exit {code}")  # --hypothesis-show-statistics shows how many got past the checks
    if code == 0:
        return
    lines = err.splitlines()
    assert code == 2, (argv, err)
    assert len(lines) == 1 and lines[0].startswith("kdrun: error: "), (argv, err)
