"""The epoch row's sinks (`convnext_fast.sinks`): the library call `train(cfg, report=..., sinks=...)` hands every
sink the very rows metrics.jsonl holds, a report callback can stop the run at an epoch boundary (train returns its
summary with stopped_by; the checkpoint is kept and resumes), a signal still raises Interrupted, and a failing
sink is one warning while the run and its files go on."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from convnext_fast.config import build_config
from convnext_fast.errors import Interrupted
import convnext_fast


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    for split, n in (("train", 8), ("val", 3)):
        for c, name in enumerate(("red", "green")):
            d = root / split / name
            d.mkdir(parents=True)
            for i in range(n):
                px = rng.integers(0, 90, (36, 36, 3))
                px[..., c] += 150
                Image.fromarray(px.astype(np.uint8)).save(d / f"{i}.jpg")
    return root


def cfg(data: Path, out: Path, epochs: int = 3):
    return build_config(flags={
        "data": {"path": str(data), "loader": "torchvision", "num_workers": 0, "img_size": 32, "batch_size": 8},
        "model": {"name": "convnext_atto"}, "run": {"device": "cpu", "epochs": epochs, "out": str(out)}})


class Recorder:
    name = "recorder"

    def __init__(self) -> None:
        self.events: list = []

    def start(self, run_dir, config, resumed):
        self.events.append(("start", Path(run_dir), config["run"]["epochs"], resumed))

    def epoch(self, row):
        self.events.append(("epoch", dict(row)))

    def end(self, state, summary):
        self.events.append(("end", state, summary is not None))


class Broken:
    def epoch(self, row):
        raise ConnectionError("tracking server down\nsecond line")


def test_sinks_get_the_metrics_rows_and_a_failing_sink_is_one_warning(data, tmp_path, capsys):
    rec, out = Recorder(), tmp_path / "run"
    summary = convnext_fast.train(cfg(data, out, epochs=2), sinks=[Broken(), rec], tty=False)
    saved = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rec.events[0] == ("start", out, 2, False)
    assert [e[1] for e in rec.events if e[0] == "epoch"] == saved and len(saved) == 2
    assert rec.events[-1] == ("end", "finished", True)
    assert summary["epochs_run"] == 2
    err = capsys.readouterr().out
    assert err.count("Broken failed in epoch()") == 1 and "tracking server down" in err
    assert "second line" not in err


def test_report_callback_stops_at_the_epoch_boundary_and_the_run_resumes(data, tmp_path):
    out, seen = tmp_path / "run", []
    rec = Recorder()
    summary = convnext_fast.train(cfg(data, out), report=lambda row: seen.append(row["epoch"]) or True, sinks=[rec],
                                  tty=False)
    assert seen == [1] and summary["epochs_run"] == 1 and summary["stopped_by"] == "report callback"
    assert rec.events[-1] == ("end", "stopped", True)
    assert json.loads((out / "summary.json").read_text())["stopped_by"] == "report callback"
    assert (out / "checkpoints" / "last.pt").exists()
    summary = convnext_fast.train(cfg(data, out), resume=True, report=lambda row: seen.append(row["epoch"]), tty=False)
    assert seen == [1, 2, 3] and summary["epochs_run"] == 3 and summary["stopped_by"] is None


def test_a_signal_still_raises_interrupted(data, tmp_path):
    """SIGTERM (a pre-empted job) is not a stop the caller asked for: Interrupted, with the resume command."""
    import os
    import signal

    out = tmp_path / "run"

    def kill(row):
        os.kill(os.getpid(), signal.SIGTERM)  # arrives at the epoch boundary, as a scheduler's SIGTERM would

    with pytest.raises(Interrupted, match="SIGTERM.*end of epoch 1.*--resume") as e:
        convnext_fast.train(cfg(data, out), report=kill, tty=False)
    assert e.value.exit_code == 128 + signal.SIGTERM and not (out / "summary.json").exists()
