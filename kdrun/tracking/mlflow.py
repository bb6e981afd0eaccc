"""MLflow runs (`logger=mlflow`): the resolved config as params (flattened: `student.model.hidden`), every
metrics.jsonl number per epoch (step = epoch), tags (kdrun.command, kdrun.teacher_key, kdrun.status, ...)
and the run's files as artifacts (those named in `artifacts`). A sweep's jobs and a pipeline's runs are
child runs (the `mlflow.parentRunId` tag). The tracking URI is a local SQLite store by default (no server:
`sqlite:///PATH/mlflow.db`, its artifacts in PATH/artifacts) or any server (`http://HOST:PORT`).
Needs `pip install 'kdrun[mlflow]'`; mlflow is imported at the first call, never for `--help`."""

import json
import os
import re
import time
from pathlib import Path

from kdrun import run_config

STATUS = {"completed": "FINISHED", "reused": "FINISHED", "failed": "FAILED", "interrupted": "KILLED"}
MAX_VALUE = 6000  # MLflow's longest param value
BATCH = 100  # MLflow's most params or tags per log_batch


class MlflowTracker:
    requires = "mlflow"
    extra = "mlflow"

    def __init__(self, tracking_uri, experiment="kdrun", artifacts=("results.json", "model.pt"), http_retries=2,
                 http_timeout=20):
        self.tracking_uri, self.experiment, self.artifacts = str(tracking_uri), experiment, set(artifacts)
        self.http_retries, self.http_timeout = int(http_retries), int(http_timeout)
        self._client, self._experiment_id = None, None

    @property
    def client(self):
        if self._client is None:
            # read by mlflow at every request: a server that is down fails fast instead of retrying for minutes
            os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = str(self.http_retries)
            os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = str(self.http_timeout)
            from mlflow.exceptions import MlflowException
            from mlflow.tracking import MlflowClient

            artifact_location = None
            if self.tracking_uri.startswith("sqlite:///"):  # a local store: its artifacts beside the database
                db = Path(self.tracking_uri[len("sqlite:///"):])
                db.parent.mkdir(parents=True, exist_ok=True)
                artifact_location = str(db.parent.resolve() / "artifacts")
            client = MlflowClient(tracking_uri=self.tracking_uri)
            experiment = client.get_experiment_by_name(self.experiment)
            if experiment is not None:
                self._experiment_id = experiment.experiment_id
            else:
                try:
                    self._experiment_id = client.create_experiment(self.experiment, artifact_location=artifact_location)
                except MlflowException:  # another job of the sweep created it first
                    self._experiment_id = client.get_experiment_by_name(self.experiment).experiment_id
            self._client = client
        return self._client

    def start(self, run_dir, name, tags, parent):
        tags = dict(tags)
        if parent:
            tags["mlflow.parentRunId"] = parent
        client = self.client
        return client.create_run(self._experiment_id, run_name=name, tags=tags).info.run_id

    def config(self, run, config):
        from mlflow.entities import Param

        params = [Param(k, v) for k, v in flatten(config).items()]
        for i in range(0, len(params), BATCH):
            self.client.log_batch(run, params=params[i:i + BATCH])

    def resumed_at(self, run, epoch):
        if epoch:
            self.client.set_tag(run, "kdrun.resumed_at_epoch", str(epoch))

    def metrics(self, run, values, step):
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(run, metrics=[Metric(key(k), v, now, int(step)) for k, v in values.items()])

    def finish(self, run, files, status, tags):
        from mlflow.entities import RunTag

        client = self.client
        for path in files:
            if Path(path).name in self.artifacts:
                client.log_artifact(run, str(path))
        client.log_batch(run, tags=[RunTag(k, str(v)) for k, v in tags.items()])
        client.set_terminated(run, status=STATUS.get(status, "FINISHED"))

    def close(self):
        pass


def key(name):
    """An MLflow key: letters, digits and _ - . / and space; anything else becomes _."""
    return re.sub(r"[^\w\-./ ]", "_", str(name))


def flatten(config):
    """{dotted key: value as text} of a nested config: strings as they are, the rest as JSON."""
    return {key(name): (v if isinstance(v, str) else json.dumps(v, default=str))[:MAX_VALUE]
            for name, v in run_config.flatten(config).items()}
