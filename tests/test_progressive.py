"""Progressive resolution: the schedule's arithmetic, the bad flags, every loader backend following it (one DALI
pipeline for all sizes, persistent torchvision workers), and the plot marks. The end-to-end run, its metrics and
the exact resume mid-ramp are in test_train.py."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from convnext_fast.cli import main
from convnext_fast.config import PRESETS, build_config
from convnext_fast.data import build_loader, scan_folder
from convnext_fast.run_files import plot_curves, size_changes
from convnext_fast.schedule import ResolutionSchedule, check_model_sizes, default_ramp


def sizes(**kw) -> list[int]:
    return ResolutionSchedule(**kw).per_epoch


# --- schedule arithmetic ---------------------------------------------------------------------------------------

def test_ffcv_rn50_shape_and_default_proportions():
    # FFCV's rn50 88-epoch config (0-based start_ramp 65, end_ramp 76, multiples of 32): 160 -> 192.
    assert default_ramp(88) == (66, 77) and default_ramp(16) == (12, 14)  # FFCV 16 epochs: 11 -> 13, 0-based
    s = ResolutionSchedule(img_size=192, epochs=88, start_size=160)
    per = s.per_epoch
    assert per[:66] == [160] * 66 and per[76:] == [192] * 12
    assert per[66:76] == [160] * 5 + [192] * 5  # interp(67..76) rounded to 32: the midpoint rounds up
    assert s.sizes == [160, 192] and s.epochs_at(192) == list(range(72, 89))


def test_seed_recipe_progressive_preset():
    cfg = build_config(preset="seed-recipe-progressive")
    assert {k: v for k, v in PRESETS["seed-recipe-progressive"].items() if k != "data"} == \
        {k: v for k, v in PRESETS["seed-recipe"].items() if k != "data"}
    s = cfg.resolution_schedule()
    assert (cfg.data.img_size, cfg.data.progressive, s.resolved_ramp) == (192, 128, (112, 131))
    assert s.sizes == [128, 160, 192]
    assert s.segments() == [(128, 1, 116), (160, 117, 126), (192, 127, 150)]
    assert s.per_epoch[-20:] == [192] * 20
    assert "128px epochs 1-116" in s.describe() and s.to_dict()["per_epoch"] == s.per_epoch
    assert build_config(preset="seed-recipe").resolution_schedule().sizes == [192]  # off in the old presets


def test_rounding_clamping_and_ramp_edges():
    # linear 64 -> 96 over epochs 2..6, step 16: 64, 64, 72->80 (half up), 80, 88->96, 96, 96
    assert sizes(img_size=96, epochs=7, start_size=64, ramp=(2, 6), res_step=16) == [64, 64, 80, 80, 96, 96, 96]
    # step 1: the exact interpolation
    assert sizes(img_size=96, epochs=5, start_size=64, ramp=(1, 5), res_step=1) == [64, 72, 80, 88, 96]
    # rounding never leaves [start, final]: 176 is not a multiple of 32, the ramp's sizes stay <= 176
    assert max(sizes(img_size=176, epochs=10, start_size=128, ramp=(2, 9))) == 176
    # ramp at the edges
    assert sizes(img_size=96, epochs=4, start_size=64, ramp=(0, 0)) == [96] * 4  # final size from the start
    assert sizes(img_size=96, epochs=4, start_size=64, ramp=(4, 4)) == [64] * 4  # never reaches it
    assert sizes(img_size=96, epochs=4, start_size=64, ramp=(2, 2)) == [64, 64, 96, 96]  # a step
    assert sizes(img_size=96, epochs=4, start_size=64, ramp=(0, 4), res_step=8) == [72, 80, 88, 96]
    # one-epoch runs: the default ramp 0:0 trains at the final size; fixed is fixed
    assert sizes(img_size=96, epochs=1, start_size=64) == [96]
    assert sizes(img_size=96, epochs=1) == [96] and not ResolutionSchedule(96, 3, start_size=96).progressive
    assert ResolutionSchedule(96, 3).describe() == "96px (fixed)"
    assert ResolutionSchedule(96, 200, start_size=64).size(500) == 96  # past the run: the final size


def test_recompile_warning_counts_the_sizes_met_so_far():
    s = ResolutionSchedule(img_size=64, epochs=3, start_size=32, ramp=(1, 3), res_step=16)  # 32, 48, 64
    assert s.recompile_warning(None, 2) is None  # eager
    assert s.recompile_warning(1, 0) is None and s.recompile_warning(3, 2) is None
    assert "made 2 graphs for 1 training size(s) by epoch 1" in s.recompile_warning(2, 0)


@pytest.mark.parametrize("kw, needle", [
    (dict(start_size=256), "--progressive 256"),
    (dict(start_size=128, ramp=(5, 3)), "--ramp 5:3"),
    (dict(start_size=128, ramp=(-1, 3)), "--ramp -1:3"),
    (dict(start_size=128, ramp=(2, 11)), "--ramp 2:11"),
    (dict(start_size=64, ramp=(0, 10), res_step=8), "--res-step 8 leaves 10 distinct sizes (80, 88, 104"),
    (dict(start_size=128, res_step=0), "--res-step must be >= 1"),
    (dict(ramp=(2, 5)), "--ramp 2:5 needs --progressive"),
])
def test_bad_schedules_name_the_flag(kw, needle):
    with pytest.raises(ValueError, match=re.escape(needle)):
        ResolutionSchedule(img_size=192, epochs=10, **kw)


def test_sizes_below_the_models_stride_are_refused():
    check_model_sizes(ResolutionSchedule(96, 4, start_size=32), "convnext_atto")  # 32 = the total stride: ok
    with pytest.raises(ValueError, match="--progressive 24: convnext_atto needs sizes >= 32"):
        check_model_sizes(ResolutionSchedule(96, 4, start_size=24, res_step=8), "convnext_atto")


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """3 classes x 8 textured JPEGs of assorted sizes (RandAugment and crops have something to move)."""
    root = tmp_path_factory.mktemp("prog")
    rng = np.random.default_rng(0)
    for c in ("a", "b", "c"):
        (root / c).mkdir()
        for i in range(8):
            w, h = (56, 48) if i % 2 else (44, 60)
            Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(root / c / f"{i}.jpg")
    return root


@pytest.mark.parametrize("argv, needle", [
    (["--progressive", "128", "--img-size", "96"], "--progressive 128"),
    (["--progressive", "32", "--ramp", "3:2"], "--ramp 3:2"),
    (["--progressive", "32", "--ramp", "1:9"], "--ramp 1:9"),
    (["--progressive", "32", "--ramp", "one"], "--ramp: expected START:END"),
    (["--progressive", "32", "--res-step", "1", "--ramp", "0:12", "--epochs", "12"], "--res-step 1 leaves 12"),
    (["--progressive", "16", "--res-step", "16"], "--progressive 16: convnext_atto needs sizes >= 32"),
    (["--eval-img-size", "16"], "--eval-img-size 16: convnext_atto needs sizes >= 32"),
    (["--ramp", "1:2"], "--ramp 1:2 needs --progressive"),
])
def test_cli_bad_flags_are_one_line_errors_before_any_work(root, tmp_path, capsys, argv, needle):
    out = tmp_path / "run"
    rc = main(["train", str(root), "--val-split", "0.25", "--out", str(out), "--model", "convnext_atto",
               "--loader", "synthetic", "--device", "cpu", "--img-size", "64", "--epochs", "4", *argv])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and needle in err and len(err.splitlines()) == 1, err
    assert not out.exists()  # nothing was written: refused before any work


# --- loaders ---------------------------------------------------------------------------------------------------

SCHED = ResolutionSchedule(img_size=64, epochs=3, start_size=32, ramp=(1, 3), res_step=16)  # 32, 48, 64


def _first_batch(loader, epoch: int) -> torch.Tensor:
    loader.set_epoch(epoch)
    return next(iter(loader)).images


def _loader(root, backend, **kw):
    opts = dict(train=True, batch_size=6, backend=backend, device="cpu", seed=3, hflip=0.5, randaugment=(2, 9))
    opts.update(kw)
    return build_loader(scan_folder(root), **opts)


@pytest.mark.parametrize("backend, workers", [("dali", 1), ("torchvision", 0), ("torchvision", 1), ("synthetic", 0)],
                         ids=["dali", "torchvision-main", "torchvision-persistent-worker", "synthetic"])
def test_loaders_change_size_at_the_scheduled_epochs(root, backend, workers):
    if backend == "dali":
        pytest.importorskip("nvidia.dali")
    loader = _loader(root, backend, img_size=64, schedule=SCHED, num_workers=workers)
    try:
        seen = []
        for epoch in (0, 1, 2, 1):  # back to an earlier epoch too (a resume replays the schedule)
            loader.set_epoch(epoch)
            shapes = {tuple(b.images.shape[2:]) for b in loader}
            assert len(shapes) == 1
            seen.append((shapes.pop()[0], loader.img_size))
            if backend == "dali":
                pipe = loader._pipe if epoch == 0 else pipe
                assert loader._pipe is pipe  # one pipeline for every size: never rebuilt
        assert seen == [(32, 32), (48, 48), (64, 64), (48, 48)]
        if backend != "synthetic":
            # The epoch's batches equal those of a fixed-size loader at that size: the crop/RandAugment plans got
            # the epoch's size (translate magnitudes scale with it), not the final one.
            fixed = _loader(root, backend, img_size=48, num_workers=workers)
            try:
                assert torch.equal(_first_batch(loader, 1), _first_batch(fixed, 1))
            finally:
                fixed.close()
    finally:
        loader.close()


def test_schedule_is_for_train_loaders_with_its_final_size(root):
    with pytest.raises(ValueError, match="final size 64"):
        _loader(root, "synthetic", img_size=96, schedule=SCHED)
    with pytest.raises(ValueError, match="training loaders"):
        _loader(root, "synthetic", img_size=64, schedule=SCHED, train=False)


# --- plots -----------------------------------------------------------------------------------------------------

def test_plots_mark_the_size_changes(tmp_path):
    rows = [{"epoch": e, "img_size": s, "train_loss": 1.0 / e, "val_top1": 10.0 * e, "lr": 1e-3}
            for e, s in enumerate([32, 32, 48, 64], start=1)]
    assert size_changes(rows) == [(2.5, 48), (3.5, 64)]
    assert size_changes([{k: v for k, v in r.items() if k != "img_size"} for r in rows]) == []
    assert size_changes(rows[:2]) == []
    made = plot_curves(rows, tmp_path)
    assert {p.name for p in made} == {"loss.png", "accuracy.png", "lr.png"}


def test_toml_keys_and_help(tmp_path, capsys):
    toml = tmp_path / "c.toml"
    toml.write_text('[data]\nimg_size = 96\nprogressive = 64\nramp = [2, 4]\nres_step = 16\neval_img_size = 128\n'
                    '[run]\nepochs = 5\n')
    cfg = build_config(config_file=toml)
    assert cfg.resolution_schedule().per_epoch == [64, 64, 80, 96, 96] and cfg.data.eval_img_size == 128
    toml.write_text('[data]\nimg_size = 96\nprogressive = 64\nramp = [2, 9]\n[run]\nepochs = 5\n')
    with pytest.raises(ValueError, match=re.escape(f"config file {toml}: --ramp 2:9: needs 0 <= START <= END")):
        build_config(config_file=toml)
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    shown = " ".join(capsys.readouterr().out.split())
    assert "--progressive START_PX|off" in shown and "3/4:7/8 of the run" in shown and "65->76" in shown
    assert "seed-recipe-progressive" in shown
