"""`--mlflow [URI]`: one MLflow run per training run, through `MlflowClient` (no global "active run": several
trainings in one process, e.g. a notebook or `tune`, each keep their own).

    start: the run (created, or the stored one on --resume), params = the resolved config (dotted keys)
    epoch: the row's numbers as metrics, step = epoch
    end:   the run directory's small files as artifacts (+ model.safetensors with --mlflow-model), the
           summary's numbers as metrics, the run's status (FINISHED, KILLED for interrupted, FAILED)

URI ``auto`` = the client's own default (MLFLOW_TRACKING_URI, else its local default); the experiment is
MLflow's own choice too (MLFLOW_EXPERIMENT_NAME / MLFLOW_EXPERIMENT_ID, else "Default").
"""
from __future__ import annotations

import os
import socket
import time
from pathlib import Path
from urllib.parse import urlparse

from convnext_fast.trackers import flat_config, load_ids, missing, save_ids, scalars

ARTIFACTS = ("config.json", "classes.json", "metrics.jsonl", "summary.json", "per_class.json", "status.json",
             "bad_files.txt")
_END_STATUS = {"finished": "FINISHED", "stopped_early": "FINISHED", "stopped": "KILLED", "interrupted": "KILLED",
               "failed": "FAILED"}  # stopped: a callback (a pruner, a time limit) ended it early; resumable
_PARAM_MAX = 500  # MLflow's param value limit before 2.x raised it to 6000; the lower one works with every server
_CONNECT_TIMEOUT_S = 5.0


class MLflowTracker:
    name = "MLflow"

    def __init__(self, uri: str, log_model: bool = False) -> None:
        self.uri = None if uri == "auto" else uri
        self.log_model = log_model
        self.client = self.run_id = self.run_dir = None

    def start(self, run_dir: Path, config: dict, resumed: bool) -> None:
        try:
            from mlflow.tracking import MlflowClient
        except ImportError:
            raise missing("mlflow") from None
        _check_reachable(self.uri or os.environ.get("MLFLOW_TRACKING_URI"))
        self.run_dir, self.client = Path(run_dir), MlflowClient(tracking_uri=self.uri)
        uri = self.client.tracking_uri
        stored = load_ids(run_dir).get("mlflow", {})
        params: dict = {}
        if resumed and stored.get("run_id") and stored.get("tracking_uri") == uri:
            run = self.client.get_run(stored["run_id"])  # raises if the server lost it: one warning, no new run
            self.run_id, params = run.info.run_id, run.data.params
            self.client.update_run(self.run_id, status="RUNNING")
        else:
            run = self.client.create_run(_experiment_id(self.client), run_name=self.run_dir.name,
                                         tags={"convnext_fast.run_dir": str(self.run_dir.resolve())})
            self.run_id = run.info.run_id
            save_ids(run_dir, "mlflow", {"run_id": self.run_id, "tracking_uri": uri,
                                         "experiment_id": run.info.experiment_id})
        self._log_params({k: v for k, v in flat_config(config).items() if k not in params})

    def _log_params(self, values: dict) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:_PARAM_MAX]) for k, v in values.items()]
        for i in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(self.run_id, params=items[i:i + 100])

    def epoch(self, row: dict) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, int(row["epoch"]))
                                                    for k, v in scalars(row).items()])

    def end(self, state: str, summary: dict | None) -> None:
        if self.run_id is None:
            return
        from mlflow.entities import Metric

        if summary:
            now = int(time.time() * 1000)
            numbers = {k: v for k, v in scalars(summary).items() if k in ("best_top1", "best_epoch", "wall_time_s")}
            if numbers:
                self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, 0) for k, v in numbers.items()])
        for name in ARTIFACTS + (("model.safetensors",) if self.log_model else ()):
            if (self.run_dir / name).is_file():
                self.client.log_artifact(self.run_id, str(self.run_dir / name))
        if (self.run_dir / "plots").is_dir():
            self.client.log_artifacts(self.run_id, str(self.run_dir / "plots"), "plots")
        self.client.set_terminated(self.run_id, _END_STATUS.get(state, "FAILED"))


def _experiment_id(client) -> str:
    if os.environ.get("MLFLOW_EXPERIMENT_ID"):
        return os.environ["MLFLOW_EXPERIMENT_ID"]
    name = os.environ.get("MLFLOW_EXPERIMENT_NAME")
    if not name:
        return "0"  # MLflow's "Default" experiment
    exp = client.get_experiment_by_name(name)
    return exp.experiment_id if exp is not None else client.create_experiment(name)


def _check_reachable(uri: str | None) -> None:
    """An HTTP tracking server that does not answer a TCP connect within 5 s is an error now: MLflow's client
    would retry each call with backoff for minutes, holding the training loop."""
    if not uri or urlparse(uri).scheme not in ("http", "https"):
        return
    u = urlparse(uri)
    port = u.port or (443 if u.scheme == "https" else 80)
    try:
        socket.create_connection((u.hostname, port), timeout=_CONNECT_TIMEOUT_S).close()
    except OSError as e:
        raise ConnectionError(f"cannot reach the MLflow tracking server {uri} ({e.strerror or e})") from None
