"""Experiment tracking (`logger=tensorboard|mlflow|[tensorboard,mlflow]`): what is logged, read back with the
libraries' own readers (TensorBoard's EventAccumulator, MLflow's MlflowClient) from a local store and from a
real `mlflow server` on loopback, and a tracker that fails costing one warning line, never the run."""

import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from conftest import KDRUN
from kdrun import tracking
from kdrun.errors import KdrunError
from kdrun.interrupt import Interrupted

TINY = ["alpha=0", "dataset=fashion_mnist", "dataset.limit=300", "dataset.test_limit=100", "progress=false"]
WARNING = "tracking: mlflow is off from here on (the run goes on): "


def accumulator(log_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "tensors": 0, "images": 0})
    acc.Reload()
    return acc


def text_of(acc, tag):
    from tensorboard.util import tensor_util

    return [tensor_util.make_ndarray(e.tensor_proto).item().decode() for e in acc.Tensors(f"{tag}/text_summary")]


def rows_of(run_dir):
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def numbers(row):
    return {k: v for k, v in row.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def leaves(config, prefix=""):
    """The dotted keys of a nested config's values (what MLflow's params are named)."""
    out = []
    for k, v in config.items():
        out += leaves(v, f"{prefix}{k}.") if isinstance(v, dict) and v else [f"{prefix}{k}"]
    return out


def client(uri):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def runs_of(mlflow, experiment="kdrun"):
    exp = mlflow.get_experiment_by_name(experiment)
    return {r.info.run_name: r for r in mlflow.search_runs([exp.experiment_id])}


def kdrun_cli(env, cwd, *args):
    """`kdrun ARGS` in a subprocess, bounded in time."""
    return subprocess.run([*KDRUN, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=300)


@pytest.fixture
def quiet_env(env):
    """The conftest env, with mlflow's usage telemetry off (the tests run offline)."""
    return {**env, "MLFLOW_DISABLE_TELEMETRY": "true"}


def closed_port():
    """A loopback port that nothing listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------- in this process, no tracking library needed


class Recording:
    """A tracker that records its calls; `fail_on` names a method that raises."""

    def __init__(self, fail_on=None):
        self.calls, self.fail_on = [], fail_on

    def __getattr__(self, method):
        def call(*args):
            self.calls.append((method, *args))
            if method == self.fail_on:
                raise ConnectionError("server down\nsecond line")
            return f"{method}-id" if method == "start" else None

        return call


def test_a_failing_tracker_costs_one_warning_and_the_others_go_on(tmp_path, caplog):
    good, bad = Recording(), Recording(fail_on="metrics")
    trackers = tracking.Trackers({"good": good, "bad": bad}, keys={"bad": "bad-config"})
    run = tracking.Run(trackers, tmp_path, trackers.start(tmp_path, "run", {"kdrun.command": "distill"}))
    with caplog.at_level(logging.WARNING, logger="kdrun"):
        for epoch in (1, 2, 3):
            run.epoch_end({"epoch": epoch, "loss": 0.5, "test_errors": 3, "train_accuracy": None, "members": [1, 2]})
        run.finish()
    assert [r.getMessage() for r in caplog.records] == [
        "tracking: bad is off from here on (the run goes on): ConnectionError: server down"]
    assert [c[0] for c in bad.calls] == ["start", "metrics", "close"]  # dropped at its first failure
    assert [c[0] for c in good.calls] == ["start", "metrics", "metrics", "metrics", "finish"]
    assert good.calls[1] == ("metrics", "start-id", {"epoch": 1.0, "loss": 0.5, "test_errors": 3.0}, 1)
    assert good.calls[-1][3:] == ("completed", {"kdrun.status": "completed"})
    assert "bad-config" in tracking._broken  # not built again in this process (a sweep's next jobs)
    tracking._broken.discard("bad-config")


def test_a_run_that_raised_is_failed_with_its_error(tmp_path):
    rec = Recording()
    trackers = tracking.Trackers({"rec": rec})
    (tmp_path / "results.json").write_text(json.dumps({"status": "completed", "teacher_key": "abc123"}))
    tracking.Run(trackers, tmp_path, {"rec": "r"}).finish(KdrunError("loss is nan at epoch 2"))
    method, run, files, status, tags = rec.calls[-1]
    assert (method, run, status) == ("finish", "r", "failed")
    assert tags == {"kdrun.status": "failed", "kdrun.teacher_key": "abc123", "kdrun.error": "loss is nan at epoch 2"}
    assert files == [tmp_path / "results.json"]
    tracking.Run(trackers, tmp_path, {"rec": "r"}).finish(Interrupted(signal.SIGTERM))
    assert rec.calls[-1][3:] == ("interrupted", {"kdrun.status": "interrupted", "kdrun.teacher_key": "abc123",
                                                 "kdrun.error": "SIGTERM"})
    # a pipeline's run that completed before the pipeline failed stays completed
    tracking.Run(trackers, tmp_path, {"rec": "r"}).finish(KdrunError("later"), error_wins=False)
    assert rec.calls[-1][3:] == ("completed", {"kdrun.status": "completed", "kdrun.teacher_key": "abc123"})


def compose(*overrides):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from kdrun.configs import conf_dir

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        return hydra_compose(config_name="distill", overrides=list(overrides))


def row(epoch, loss):
    return {"epoch": epoch, "step": 3 * epoch, "lr": 0.1, "loss": loss, "train_accuracy": 0.5,
            "test_errors": 10 - epoch,
            "n_test": 100, "test_accuracy": (90 + epoch) / 100, "seconds": 1.0}


def test_tensorboard_gets_the_recorders_rows_config_and_a_resume(tmp_path):
    from kdrun.run import Recorder

    cfg = compose("logger=tensorboard", f"workdir={tmp_path}")
    (tmp_path / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    with tracking.job(cfg, tmp_path):
        rec = Recorder(tmp_path, "distill:mlp800")
        rec.keep_epochs(0)
        for epoch in (1, 2):
            rec.epoch_end(row(epoch, loss=1.0 / epoch))
    with tracking.job(cfg, tmp_path):  # resumed after epoch 1: epoch 2 again, then 3
        rec = Recorder(tmp_path, "distill:mlp800")
        rec.keep_epochs(1)
        for epoch in (2, 3):
            rec.epoch_end(row(epoch, loss=7.0 * epoch))
    assert tracking.run_for(tmp_path) is None  # nothing is tracked outside a job
    acc = accumulator(tmp_path / "tensorboard")
    assert set(acc.Tags()["scalars"]) == set(row(1, 0))
    assert [(s.step, s.value) for s in acc.Scalars("loss")] == [(1, 1.0), (2, 14.0), (3, 21.0)]
    assert [(s.step, s.value) for s in acc.Scalars("test_errors")] == [(1, 9.0), (2, 8.0), (3, 7.0)]
    assert text_of(acc, "config")[0].splitlines()[:2] == ["    teacher:", "      model:"]


def test_only_rank_0_tracks(tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    cfg = compose("logger=tensorboard", f"workdir={tmp_path}")
    with tracking.job(cfg, tmp_path) as job:
        assert job is None and tracking.run_for(tmp_path) is None
    assert not (tmp_path / "tensorboard").exists()


def test_a_missing_tracking_library_is_one_error_naming_its_extra(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a))
    tracking.check(compose("logger=tensorboard"))
    with pytest.raises(KdrunError) as e:
        tracking.check(compose("logger=[tensorboard,mlflow]"))
    assert str(e.value) == "logger=mlflow needs the mlflow package: pip install 'kdrun[mlflow]'"


def test_logger_picks_several_trackers_and_names_an_unknown_one():
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from kdrun.launch import _check_group_choices

    parse = OverridesParser.create().parse_overrides
    _check_group_choices(parse(["logger=[tensorboard,mlflow]"]))
    assert sorted(compose("logger=[tensorboard,mlflow]").logger.trackers) == ["mlflow", "tensorboard"]
    assert dict(compose().logger.trackers) == {}
    with pytest.raises(KdrunError) as e:
        _check_group_choices(parse(["logger=[tensorboard,wandb]"]))
    assert str(e.value) == "unknown logger 'wandb'; choose from: mlflow, none, tensorboard"


# ---------------------------------------------------------------- the CLI, in subprocesses


@pytest.mark.slow
def test_unknown_logger_is_one_error_line(quiet_env, tmp_path):
    proc = kdrun_cli(quiet_env, tmp_path, "distill", *TINY, "logger=wandb")
    assert proc.returncode == 2
    assert proc.stderr.strip() == "kdrun: error: unknown logger 'wandb'; choose from: mlflow, none, tensorboard"
    assert not Path(quiet_env["KDRUN_WORKDIR"]).exists()


@pytest.mark.slow
def test_sweep_to_both_trackers_is_a_parent_run_with_a_child_per_job(quiet_env, tmp_path, workdir):
    proc = kdrun_cli(quiet_env, tmp_path, "distill", "-m", "logger=[tensorboard,mlflow]", *TINY, "epochs=2", "seed=0,1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "tracking:" not in proc.stderr and "Traceback" not in proc.stderr
    (sweep,) = (workdir / "sweeps" / "distill").iterdir()
    mlflow = client(f"sqlite:///{workdir}/mlruns/mlflow.db")
    runs = runs_of(mlflow)
    assert set(runs) == {f"distill sweep {sweep.name}", "0: seed=0", "1: seed=1"}
    parent = runs[f"distill sweep {sweep.name}"]
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["kdrun.sweep"].startswith("logger=[tensorboard,mlflow]")
    assert {a.path for a in mlflow.list_artifacts(parent.info.run_id)} == {"summary.csv", "report.md", "report.csv"}
    report = mlflow.download_artifacts(parent.info.run_id, "report.md", str(tmp_path / "report"))
    assert text_of(accumulator(sweep / "tensorboard"), "report") == [Path(report).read_text()]
    assert "| student alone" in Path(report).read_text()  # both jobs' row (alpha=0: no plot to show)
    for job in ("0", "1"):
        run, job_dir = runs[f"{job}: seed={job}"], sweep / job
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert run.info.status == "FINISHED"
        assert {k: run.data.tags[k] for k in ("kdrun.command", "kdrun.status", "kdrun.job", "kdrun.student")} == {
            "kdrun.command": "distill", "kdrun.status": "completed", "kdrun.job": job, "kdrun.student": "mlp800"}
        # params: the run's resolved config (config.yaml), flattened
        config = OmegaConf.to_container(OmegaConf.load(job_dir / "config.yaml"))
        params = run.data.params
        assert set(params) == set(leaves(config))
        assert params["seed"] == job and params["student.recipe.epochs"] == "2" and params["dataset.limit"] == "300"
        assert params["student.model.hidden"] == "[800, 800]" and params["logger.trackers.mlflow._target_"] == \
            "kdrun.tracking.mlflow.MlflowTracker"
        # metrics: every number of every metrics.jsonl row, at its epoch; TensorBoard has the same
        rows = rows_of(job_dir)
        assert len(rows) == 2
        acc = accumulator(job_dir / "tensorboard")
        assert set(acc.Tags()["scalars"]) == set(numbers(rows[0])) == set(run.data.metrics)
        for key in numbers(rows[0]):
            expected = [(r["epoch"], pytest.approx(r[key], rel=1e-6)) for r in rows]
            assert [(m.step, m.value) for m in mlflow.get_metric_history(run.info.run_id, key)] == expected
            assert [(s.step, s.value) for s in acc.Scalars(key)] == expected
        assert text_of(acc, "config") == ["\n".join("    " + line for line in
                                                    (job_dir / "config.yaml").read_text().splitlines())]
        # artifacts: the run's files, byte for byte
        assert {a.path for a in mlflow.list_artifacts(run.info.run_id)} == {"results.json", "config.yaml",
                                                                             "metrics.jsonl", "model.pt"}
        got = mlflow.download_artifacts(run.info.run_id, "results.json", str(tmp_path / f"dl{job}"))
        assert Path(got).read_bytes() == (job_dir / "results.json").read_bytes()


@pytest.mark.slow
def test_pipeline_runs_are_children_and_its_report_is_logged(quiet_env, tmp_path, workdir):
    proc = kdrun_cli(quiet_env, tmp_path, "pipeline", "logger=[tensorboard,mlflow]", "teacher=mlp30", "student=mlp30",
                     *TINY[1:], "epochs=1", "T=4", "alpha=0.5")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "tracking:" not in proc.stderr
    (run_dir,) = (workdir / "runs" / "pipeline").iterdir()
    mlflow = client(f"sqlite:///{workdir}/mlruns/mlflow.db")
    runs = runs_of(mlflow)
    root = runs[f"pipeline {run_dir.name}"]
    assert set(runs) == {root.info.run_name, "teacher", "student_alone", "distilled"}
    for name in ("teacher", "student_alone", "distilled"):
        child = runs[name]
        assert child.data.tags["mlflow.parentRunId"] == root.info.run_id and child.info.status == "FINISHED"
        assert len(mlflow.get_metric_history(child.info.run_id, "test_errors")) == 1
    teacher_key = json.loads((run_dir / "distilled" / "results.json").read_text())["teacher_key"]
    for name in ("distilled", "teacher"):
        assert runs[name].data.tags["kdrun.teacher_key"] == teacher_key
    assert "kdrun.teacher_key" not in runs["student_alone"].data.tags  # alpha=0: no teacher
    assert {"report.md", "report.csv", "report.png", "results.json"} <= {a.path for a in mlflow.list_artifacts(
        root.info.run_id)}
    acc = accumulator(run_dir / "tensorboard")
    (image,) = acc.Images("report")
    from PIL import Image

    with Image.open(run_dir / "report.png") as png:
        assert (image.width, image.height) == png.size
    assert text_of(acc, "report") == [(run_dir / "report.md").read_text()]


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """`mlflow server` on loopback (a free port), for the module; stopped at its end."""
    root = tmp_path_factory.mktemp("mlflow_server")
    port = closed_port()
    command = [str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
               "--backend-store-uri", f"sqlite:///{root}/mlflow.db", "--artifacts-destination", str(root / "artifacts"),
               "--workers", "1"]
    log = open(root / "server.log", "w")
    proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            if proc.poll() is not None:
                pytest.fail(f"mlflow server exited {proc.returncode}: {(root / 'server.log').read_text()[-2000:]}")
            with contextlib.suppress(OSError):
                with urllib.request.urlopen(f"{url}/health", timeout=2) as answer:
                    if answer.status == 200:
                        break
            if time.monotonic() > deadline:
                pytest.fail(f"mlflow server did not answer in 180 s: {(root / 'server.log').read_text()[-2000:]}")
            time.sleep(0.5)
        yield url
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)  # the server and its workers: the group it leads
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:  # uvicorn waits for the test's keep-alive connections to close
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        log.close()


@pytest.mark.slow
def test_a_run_logs_to_a_tracking_server(quiet_env, tmp_path, workdir, mlflow_server):
    proc = kdrun_cli(quiet_env, tmp_path, "distill", "logger=mlflow", f"logger.tracking_uri={mlflow_server}",
                     "logger.experiment=served", *TINY, "epochs=1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "tracking:" not in proc.stderr
    (run_dir,) = (workdir / "runs" / "distill").iterdir()
    assert not (workdir / "mlruns").exists()  # nothing in the local store
    mlflow = client(mlflow_server)
    (run,) = runs_of(mlflow, "served").values()
    assert run.info.run_name == f"distill {run_dir.name}" and run.info.status == "FINISHED"
    assert "mlflow.parentRunId" not in run.data.tags and run.data.tags["kdrun.run_dir"] == str(run_dir)
    assert run.data.params["logger.tracking_uri"] == mlflow_server
    (last,) = rows_of(run_dir)
    assert run.data.metrics == pytest.approx(numbers(last), rel=1e-6)
    got = mlflow.download_artifacts(run.info.run_id, "model.pt", str(tmp_path / "dl"))
    assert Path(got).read_bytes() == (run_dir / "model.pt").read_bytes()


@pytest.mark.slow
def test_a_dead_server_costs_one_warning_line_and_the_run_completes(quiet_env, tmp_path, workdir):
    port = closed_port()
    proc = kdrun_cli(quiet_env, tmp_path, "distill", "logger=[tensorboard,mlflow]",
                     f"logger.tracking_uri=http://127.0.0.1:{port}", "logger.http_retries=0", *TINY, "epochs=1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    warnings = [line for line in proc.stderr.splitlines() if "tracking" in line or "mlflow" in line.lower()]
    assert len(warnings) == 1, proc.stderr
    assert (WARNING + f"MlflowException: API request to http://127.0.0.1:{port}/api/2.0/mlflow/experiments/"
            "get-by-name failed") in warnings[0]
    (run_dir,) = (workdir / "runs" / "distill").iterdir()
    assert json.loads((run_dir / "results.json").read_text())["status"] == "completed"
    assert accumulator(run_dir / "tensorboard").Scalars("test_errors")  # the other tracker went on
