"""The README's library examples use our API correctly: the plain stop callback, and the Ray Tune example run
against a stand-in for `ray.tune` (Ray is not a dependency). The stand-in does what Ray's function API does
with a trial its scheduler stops: `tune.report` raises SystemExit in the trial (ray.train's session does
`sys.exit(0)` once its stop event is set)."""
from __future__ import annotations

import json
import re
import sys
import types
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import convnext_fast
import convnext_fast.config as config_module

ROOT = Path(__file__).resolve().parents[1]
TINY = {"data": {"loader": "torchvision", "num_workers": 0, "img_size": 32, "batch_size": 8},
        "model": {"name": "convnext_atto"}, "run": {"device": "cpu", "epochs": 3}}


def _block(marker: str) -> str:
    blocks = [b for b in re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
              if marker in b]
    assert len(blocks) == 1, f"expected one README python block with {marker!r}"
    return blocks[0]


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


@pytest.fixture
def tiny_build_config(monkeypatch, data):
    """build_config as the examples call it, made CPU-sized: the example's own values (preset, lr, drop path,
    out) pass through unchanged; the tiny model, size, loader, device and epochs and the test's data go on top."""
    real, calls = config_module.build_config, []

    def build(*, preset=None, config_file=None, flags=None, base=None):
        merged = {s: dict(v) for s, v in (flags or {}).items()}
        for section, values in TINY.items():
            merged.setdefault(section, {}).update(values)
        merged["data"]["path"] = str(data)
        calls.append(flags)
        return real(preset=preset, config_file=config_file, flags=merged, base=base)

    monkeypatch.setattr(config_module, "build_config", build)
    return calls


def test_the_stop_callback_example_returns_a_resumable_summary(tmp_path, monkeypatch, tiny_build_config):
    monkeypatch.chdir(tmp_path)
    code = _block("summary = convnext_fast.train(")
    # The example stops a run that is still below 20% at epoch 10; with 3 epochs, stop at epoch 2 instead.
    code = code.replace('row["epoch"] >= 10 and row["val_top1"] < 20.0', 'row["epoch"] >= 2')
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    summary = namespace["summary"]
    assert summary["stopped_by"] == "report callback" and summary["epochs_run"] == 2
    assert Path("runs/a/checkpoints/last.pt").exists()
    resumed = convnext_fast.train(namespace["cfg"], resume=True, tty=False)
    assert resumed["epochs_run"] == 3 and resumed["stopped_by"] is None


class _FakeTune(types.ModuleType):
    """What the example uses of ray.tune: a Tuner that runs each trial in turn with one sampled value per
    parameter, a context with a trial dir, report (SystemExit when the 'scheduler' stops the trial)."""

    def __init__(self, trial_root: Path, stop_after: dict[int, int]):
        super().__init__("ray.tune")
        self.trial_root, self.stop_after = trial_root, stop_after  # trial index -> stop after this many reports
        self.reports: dict[int, list[dict]] = {}
        self.trial = -1
        self.resources = None

    def loguniform(self, lo, hi):
        return ("loguniform", lo, hi)

    def uniform(self, lo, hi):
        return ("uniform", lo, hi)

    def with_resources(self, fn, resources):
        self.resources = resources
        return fn

    def TuneConfig(self, **kw):  # noqa: N802 - Ray's name
        return kw

    def get_context(self):
        return types.SimpleNamespace(get_trial_dir=lambda: str(self.trial_root / f"trial_{self.trial}"))

    def report(self, metrics: dict) -> None:
        assert isinstance(metrics, dict)
        got = self.reports.setdefault(self.trial, [])
        got.append(metrics)
        if len(got) >= self.stop_after.get(self.trial, 10**9):
            sys.exit(0)  # what Ray's session does in a trial its scheduler stopped

    def Tuner(self, trainable, *, param_space, tune_config):  # noqa: N802 - Ray's name
        fake = self

        class Tuner:
            def fit(self):
                for trial in range(2):
                    fake.trial = trial
                    params = {k: v[1] + (v[2] - v[1]) * 0.5 * trial for k, v in param_space.items()}
                    try:
                        trainable(params)
                    except SystemExit:
                        pass
                return types.SimpleNamespace(get_best_result=lambda: fake.reports)
        return Tuner()


def test_the_ray_tune_example_runs_against_a_stand_in(tmp_path, monkeypatch, tiny_build_config):
    monkeypatch.setitem(TINY["run"], "epochs", 2)
    tune = _FakeTune(tmp_path / "trials", stop_after={1: 1})  # the scheduler stops trial 1 after one epoch
    ray = types.ModuleType("ray")
    ray.tune = tune
    schedulers = types.ModuleType("ray.tune.schedulers")
    schedulers.ASHAScheduler = lambda **kw: ("asha", kw)
    monkeypatch.setitem(sys.modules, "ray", ray)
    monkeypatch.setitem(sys.modules, "ray.tune", tune)
    monkeypatch.setitem(sys.modules, "ray.tune.schedulers", schedulers)
    namespace: dict = {}
    exec(compile(_block("from ray import tune"), "README.md", "exec"), namespace)
    # Trial 0 ran its 2 epochs; every report is one metrics.jsonl row, with the metric the scheduler reads.
    run0 = tmp_path / "trials" / "trial_0" / "run"
    rows = [json.loads(line) for line in (run0 / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in tune.reports[0]] == [1, 2] == [r["epoch"] for r in rows]
    assert [r["val_top1"] for r in tune.reports[0]] == [r["ema_val_top1"] for r in rows]  # seed-recipe: EMA on
    config = json.loads((run0 / "config.json").read_text())
    assert config["optim"]["lr"] == pytest.approx(1e-4) and config["model"]["drop_path"] == 0.0
    assert json.loads((run0 / "summary.json").read_text())["epochs_run"] == 2
    # Trial 1 was stopped by the scheduler inside report: its epoch-1 checkpoint is kept and resumable.
    run1 = tmp_path / "trials" / "trial_1" / "run"
    assert len(tune.reports[1]) == 1 and (run1 / "checkpoints" / "last.pt").exists()
    assert not (run1 / "summary.json").exists()
    assert len((run1 / "metrics.jsonl").read_text().splitlines()) == 1  # (a resume is tested above)
    assert tune.resources == {"gpu": 1} and tiny_build_config[0]["run"]["epochs"] == 30
