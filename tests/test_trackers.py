"""Trackers fed from the epoch row: TensorBoard events read back with TensorBoard's own reader, MLflow against a
real `mlflow server` (SQLite backend) on loopback read back with MlflowClient, W&B in offline mode; a run stopped
after epoch 1 and resumed continues the same tracker runs; a tracker whose server is down, or whose package is
missing, is one warning and the run goes on."""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

import convnext_fast
from convnext_fast.config import build_config


@pytest.fixture(scope="module")
def data(colour_data) -> Path:
    return colour_data  # conftest: train/ and val/, two colour-coded classes (read only)


def cfg(data: Path, out: Path, epochs: int, **run):
    return build_config(flags={
        "data": {"path": str(data), "loader": "torchvision", "num_workers": 0, "img_size": 32, "batch_size": 8,
                 "randaugment": None},
        "model": {"name": "convnext_atto"}, "optim": {"lr": 2e-3},
        "run": {"device": "cpu", "epochs": epochs, "out": str(out), **run}})


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MlflowServer:
    """`mlflow server` with a SQLite backend on a free loopback port, in its own process group."""

    def __init__(self, root: Path) -> None:
        self.port = _free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.log = root / "server.log"
        exe = Path(sys.executable).with_name("mlflow")
        cmd = [str(exe) if exe.exists() else shutil.which("mlflow") or "mlflow", "server",
               "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}", "--artifacts-destination", str(root / "art"),
               "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1"]
        # No job runner: it starts seven worker processes this test does not use.
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)

    def wait_ready(self, timeout: float = 120.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"mlflow server exited ({self.proc.returncode}): {self.log.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as r:
                    if r.status == 200:
                        return self.uri
            except OSError:
                time.sleep(0.5)
        pytest.fail(f"mlflow server not ready after {timeout:.0f} s: {self.log.read_text()[-2000:]}")

    def stop(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=20)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    pytest.importorskip("mlflow")
    server = MlflowServer(tmp_path_factory.mktemp("mlflow"))
    yield server
    server.stop()


@pytest.fixture
def wandb_offline(tmp_path, monkeypatch):
    for var, value in {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_CONFIG_DIR": tmp_path / "wb-config",
                       "WANDB_CACHE_DIR": tmp_path / "wb-cache", "WANDB_DATA_DIR": tmp_path / "wb-data",
                       "WANDB_API_KEY": ""}.items():
        monkeypatch.setenv(var, str(value))


def test_failing_trackers_are_one_warning_each_and_the_run_goes_on(data, tmp_path, mlflow_server, monkeypatch,
                                                                   capsys):
    # (mlflow_server is requested here only so that it boots while this test trains.)
    closed = f"http://127.0.0.1:{_free_port()}"  # nothing listens there
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError: the package is missing
    out = tmp_path / "run"
    summary = convnext_fast.train(cfg(data, out, 1, mlflow=closed, wandb="auto"), tty=False)
    assert summary["epochs_run"] == 1 and (out / "summary.json").is_file() and (out / "model.safetensors").is_file()
    lines = capsys.readouterr().out.splitlines()
    mlflow_warnings = [line for line in lines if "MLflow failed" in line]
    wandb_warnings = [line for line in lines if "W&B failed" in line]
    assert len(mlflow_warnings) == 1 and "cannot reach the MLflow tracking server" in mlflow_warnings[0]
    assert closed in mlflow_warnings[0]
    assert len(wandb_warnings) == 1 and "not installed" in wandb_warnings[0]
    assert json.loads((out / "status.json").read_text())["state"] == "finished"


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_trackers_follow_the_run_and_its_resume(data, tmp_path, mlflow_server, wandb_offline):
    pytest.importorskip("tensorboard")
    pytest.importorskip("wandb")
    from mlflow.tracking import MlflowClient

    uri = mlflow_server.wait_ready()
    out = tmp_path / "run"
    trackers = dict(tensorboard=True, mlflow=uri, wandb="convnext-fast-test")
    summary = convnext_fast.train(cfg(data, out, 3, **trackers), report=lambda row: True, tty=False)
    assert summary["stopped_by"] == "report callback" and summary["epochs_run"] == 1  # a resumable stop
    client = MlflowClient(uri)
    ids = json.loads((out / "trackers.json").read_text())
    first = client.get_run(ids["mlflow"]["run_id"])
    assert first.info.status == "KILLED" and first.info.run_name == "run"
    # the resume adds --mlflow-model (a flag given at --resume overrides the saved config)
    convnext_fast.train(cfg(data, out, 3, **trackers, mlflow_model=True), resume=True, tty=False)
    rows = _rows(out)
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    assert json.loads((out / "trackers.json").read_text()) == ids  # the same tracker runs, not new ones

    # MLflow: one run, continued; its metrics are the rows, its params the config, the small files its artifacts
    runs = client.search_runs([first.info.experiment_id])
    assert [r.info.run_id for r in runs] == [first.info.run_id]
    run = runs[0]
    assert run.info.status == "FINISHED"
    for key in ("val_top1", "train_loss", "lr"):
        history = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))
        assert history == [(r["epoch"], pytest.approx(r[key])) for r in rows], key
    assert run.data.params["model.name"] == "convnext_atto" and run.data.params["run.epochs"] == "3"
    assert run.data.metrics["best_top1"] == pytest.approx(max(r["val_top1"] for r in rows))
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.json", "metrics.jsonl", "summary.json", "per_class.json", "status.json", "plots"} <= artifacts
    assert "model.safetensors" in artifacts  # with --mlflow-model

    # TensorBoard: one run (no hparams subfolder), its scalars per epoch = metrics.jsonl, hparams in the same run
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    assert not [p for p in (out / "tb").iterdir() if p.is_dir()]
    acc = EventAccumulator(str(out / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    numeric = {k for r in rows for k, v in r.items() if isinstance(v, (int, float)) and k != "epoch"}
    assert numeric <= set(acc.Tags()["scalars"])
    for key in ("val_top1", "val_loss", "train_loss", "lr", "img_size"):
        assert [(e.step, e.value) for e in acc.Scalars(key)] == [(r["epoch"], pytest.approx(r[key], rel=1e-6))
                                                                 for r in rows], key
    hp = acc.PluginTagToContent("hparams")
    start = plugin_data_pb2.HParamsPluginData.FromString(hp["_hparams_/session_start_info"]).session_start_info
    assert start.hparams["model.name"].string_value == "convnext_atto"
    assert start.hparams["optim.lr"].number_value == pytest.approx(2e-3)

    # W&B offline: files on disk under RUN_DIR/wandb, both sessions under the one run id, nothing sent
    wb_id = ids["wandb"]["id"]
    sessions = sorted((out / "wandb").glob("offline-run-*"))
    assert len(sessions) == 2 and all(s.name.endswith(wb_id) for s in sessions)
    logged = [(s / f"run-{wb_id}.wandb").read_bytes() for s in sessions]
    assert all(b"val_top1" in b and b"train_loss" in b for b in logged)  # the rows' keys are in both sessions' logs
    assert not list((out / "wandb").glob("run-*"))  # an online run would be a run-* folder


def test_tracker_flags_and_config_keys(data, tmp_path):
    from convnext_fast.cli import build_parser
    from convnext_fast.commands.train import resolve_config

    def resolved(*argv):
        return resolve_config(build_parser(only="train").parse_args(["train", *argv]))[0].run

    run = resolved(str(data), "--tensorboard", "--mlflow", "--wandb", "my-project")
    assert (run.tensorboard, run.mlflow, run.wandb, run.mlflow_model) == (True, "auto", "my-project", False)
    run = resolved(str(data), "--mlflow", "sqlite:///x.db", "--mlflow-model", "--wandb", "off")
    assert (run.mlflow, run.mlflow_model, run.wandb) == ("sqlite:///x.db", True, None)
    with pytest.raises(ValueError, match="--mlflow took .* put DATA before --mlflow"):
        resolved("--mlflow", str(data))  # argparse gave DATA to the flag's optional value
    toml = tmp_path / "c.toml"
    toml.write_text('[run]\ntensorboard = true\nmlflow = "http://127.0.0.1:5000"\nwandb = "auto"\n')
    run = build_config(config_file=toml).run
    assert (run.tensorboard, run.mlflow, run.wandb) == (True, "http://127.0.0.1:5000", "auto")
    toml.write_text('[run]\nmlflow = ""\n')
    with pytest.raises(ValueError, match="run.mlflow"):
        build_config(config_file=toml)
