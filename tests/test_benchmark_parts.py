"""The benchmark's parts, without running a model: timing harness, memory, FLOPs, peaks, verdicts, flags."""

import time

import pytest
import torch

from convnext_fast.benchmark.run import SPEED_FEATURES, ablation_speeds, summarize
from convnext_fast.benchmark.env import forward_flops, mfu, peak_tflops, peak_tflops_for_name
from convnext_fast.benchmark.timing import Meter, PeakMemory, Timing, endless, interleave
from convnext_fast.cli import main
from convnext_fast.data import Batch
from convnext_fast.engine import BASELINE_SPEED, FAST_SPEED

CPU = torch.device("cpu")


class _SleepyLoader:
    """A loader whose every batch costs `delay` seconds of host time, `n` batches per epoch."""

    def __init__(self, n: int, delay: float, batch_size: int = 4):
        self.n, self.delay, self.batch_size = n, delay, batch_size
        self.epochs: list[int] = []
        self.num_samples = n * batch_size

    def set_epoch(self, e: int) -> None:
        self.epochs.append(e)

    def __iter__(self):
        for _ in range(self.n):
            time.sleep(self.delay)
            yield Batch(torch.zeros(self.batch_size, 3, 8, 8), torch.zeros(self.batch_size, dtype=torch.long))


def test_timing_statistics_come_from_the_windows():
    t = Timing(batch_size=8, steps=4, warmup=2, window_s=[0.4, 0.2, 0.8], warmup_s=1.5, first_s=1.2,
               peak_mem_mib=10.0)
    assert t.samples_per_sec_windows == pytest.approx([80.0, 160.0, 40.0])
    assert t.samples_per_sec == pytest.approx(80.0)  # median, not mean
    assert t.step_time_ms == pytest.approx(100.0)
    assert t.warmup_overhead_s == pytest.approx(1.5 - 2 * 0.1)
    d = t.to_dict()
    assert (d["samples_per_sec_min"], d["samples_per_sec_max"]) == (40.0, 160.0)
    assert (d["step_time_ms_min"], d["step_time_ms_max"]) == (50.0, 200.0)
    assert d["repeats"] == 3 and "data_wait_pct" not in d


def test_loop_meter_splits_data_wait_from_compute():
    loader = _SleepyLoader(n=3, delay=0.03)
    losses = []

    def step(images, labels):
        time.sleep(0.01)
        losses.append(images.sum())

    meter = Meter.loop_of(endless(loader), step, batch_size=4, device=CPU, steps=4, warmup=1)
    (timing,) = interleave([meter], repeats=2)
    # 30 ms waiting for every 40 ms step: ~75% data-wait (sleep overshoot only shifts it a little).
    assert 60 < timing.data_wait_pct < 90
    assert timing.samples_per_sec < 4 / 0.04 * 1.05
    assert len(losses) == 1 + 2 * 4
    assert loader.epochs[:3] == [0, 1, 2]  # 9 batches over 3-batch epochs: the stream crosses epochs in order


def test_meters_exclude_warmup_and_interleave_their_windows():
    loader = _SleepyLoader(n=50, delay=0.002)
    (t,) = interleave([Meter.loader(endless(loader), batch_size=4, device=CPU, steps=5, warmup=2)], repeats=2)
    assert len(t.window_s) == 2 and t.samples_per_sec < 4 / 0.002
    calls = []

    def slow_first(tag):
        calls.append(tag)
        time.sleep(0.5 if calls.count(tag) == 1 else 0.002)  # a slow first call, as a compile would be

    meters = [Meter.step(lambda tag=tag: slow_first(tag), batch_size=2, device=CPU, steps=3, warmup=2)
              for tag in "ab"]
    ta, tb = interleave(meters, repeats=3)
    assert calls == ["a"] * 2 + ["b"] * 2 + ["a"] * 3 + ["b"] * 6 + ["a"] * 6 + ["b"] * 3  # A B, B A, A B
    for timing in (ta, tb):
        assert timing.first_s >= 0.5 and timing.warmup_overhead_s >= 0.45
        assert timing.step_time_ms < 100 and len(timing.window_s) == 3  # the slow call is not in the windows


def test_peak_memory_with_state_bytes_counts_the_window_above_its_start():
    keep = []

    def step():
        keep.append(torch.ones(16 * 2**20 // 4))  # 16 MiB per call, kept: the footprint grows
        return 0.0

    meter = Meter(step, batch_size=1, device=CPU, steps=2, warmup=1, state_bytes=lambda: 100 * 2**20)
    if meter.mem.kind != "process_peak_rss":
        pytest.skip("the kernel refuses to reset the peak RSS here")
    (timing,) = interleave([meter], repeats=1)
    # 100 MiB of state + ~32 MiB allocated in the window; the 16 MiB of the warm-up and whatever else the
    # process holds are not counted.
    assert 100 + 28 < timing.peak_mem_mib < 100 + 40


def test_endless_rejects_a_loader_without_batches():
    with pytest.raises(ValueError, match="no batch"):
        next(endless(_SleepyLoader(n=0, delay=0)))


def test_cpu_peak_memory_sees_an_allocation():
    mem = PeakMemory(CPU)
    if mem.kind != "process_peak_rss":
        pytest.skip("the kernel refuses to reset the peak RSS here")
    mem.reset()
    before = mem.peak()
    x = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
    assert mem.peak() - before > 50 and mem.current() >= mem.peak() - 1
    del x


def test_peak_table_and_mfu():
    assert peak_tflops_for_name("NVIDIA A100-SXM4-80GB") == 312
    assert peak_tflops_for_name("NVIDIA H100 80GB HBM3") == 989
    assert peak_tflops_for_name("NVIDIA H100 PCIe") == 756
    assert peak_tflops_for_name("NVIDIA H200") == 989
    assert peak_tflops_for_name("NVIDIA L4") == 121
    assert peak_tflops_for_name("NVIDIA L40S") == 362
    assert peak_tflops_for_name("Tesla V100-SXM2-16GB") is None
    assert peak_tflops(CPU) == (None, pytest.approx(peak_tflops(CPU)[1]))
    assert peak_tflops(CPU, override=50.0)[0] == 50.0
    assert mfu(1000.0, 3e9, 100.0) == pytest.approx(3.0)  # 3e12 FLOP/s of 1e14
    assert mfu(1000.0, 3e9, None) is None


def test_forward_flops_match_the_published_figure_and_scale_with_area():
    # ConvNeXt-T at 224: 4.5 GMACs (Liu et al. 2022) = 8.9 GFLOPs at 2 FLOPs per multiply-add.
    assert forward_flops("convnext_tiny", 1000, 224) / 1e9 == pytest.approx(8.9, rel=0.02)
    small, big = forward_flops("convnext_atto", 10, 64), forward_flops("convnext_atto", 10, 128)
    assert big / small == pytest.approx(4.0, rel=0.05)


def test_ablations_flip_one_feature_each():
    abl = ablation_speeds(FAST_SPEED)
    assert sorted(abl) == sorted(f"no_{f}" for f in SPEED_FEATURES)
    for name, speed in abl.items():
        changed = [f for f in SPEED_FEATURES if getattr(speed, f) != getattr(FAST_SPEED, f)]
        assert changed == [name[3:]]
    # The baseline has everything off: each variant switches one feature on.
    abl = ablation_speeds(BASELINE_SPEED)
    assert sorted(abl) == sorted(f"with_{f}" for f in SPEED_FEATURES)
    assert abl["with_amp"].amp == "bf16" and abl["with_compile"].compile is True
    assert "with_compile" not in ablation_speeds(BASELINE_SPEED, with_compile=False)


def _rec(kind, name, ips, windows=None, **kw):
    windows = windows or [ips * 0.9, ips, ips * 1.1]
    return {"kind": kind, "name": name, "img_size": 64, "samples_per_sec": ips, "samples_per_sec_min": min(windows),
            "samples_per_sec_max": max(windows), "samples_per_sec_windows": windows, **kw}


def test_summary_ratios_epoch_time_and_verdict():
    records = [_rec("loader", "torchvision", 100.0), _rec("loader", "dali", 250.0), _rec("step", "baseline", 40.0),
               _rec("step", "fast", 200.0), _rec("loop", "baseline", 30.0, data_wait_pct=20.0),
               _rec("loop", "fast", 180.0, data_wait_pct=3.0)]
    s = summarize(records, 64, 9000, "cuda")
    assert s["loader_speedup_dali_vs_torchvision"] == pytest.approx(2.5)
    assert s["step_speedup"] == pytest.approx(5.0)
    assert s["e2e_speedup"] == pytest.approx(6.0)
    assert s["epoch_time_s"] == {"baseline": pytest.approx(300.0), "fast": pytest.approx(50.0)}
    assert s["pct_of_step_ceiling"]["fast"] == pytest.approx(90.0)
    assert s["limited_by"] == "model" and "90%" in s["verdict"]
    # A loader slower than the step, or a loop mostly waiting for data, puts the blame on the loader.
    records[1] = _rec("loader", "dali", 150.0)
    assert summarize(records, 64, 9000, "cuda")["limited_by"] == "loader"
    records[1] = _rec("loader", "dali", 250.0)
    records[5] = _rec("loop", "fast", 120.0, data_wait_pct=35.0)
    s = summarize(records, 64, 9000, "cuda")
    assert s["limited_by"] == "loader" and "data-wait 35%" in s["verdict"]
    # Paired ratios compare the windows of the same round: here the fast loop is behind in one round of three.
    records[4] = _rec("loop", "baseline", 100.0, windows=[100.0, 80.0, 120.0], data_wait_pct=5.0)
    records[5] = _rec("loop", "fast", 110.0, windows=[110.0, 130.0, 90.0], data_wait_pct=5.0)
    paired = summarize(records, 64, 9000, "cuda")["e2e_speedup_paired"]
    assert paired["median"] == pytest.approx(1.1) and paired["min"] == pytest.approx(0.75)
    assert paired["max"] == pytest.approx(1.625) and (paired["rounds"], paired["rounds_ahead"]) == (3, 2)
    # Without the fast loop there is no verdict and no loop speed-up.
    s = summarize(records[:5], 64, 9000, "cuda")
    assert s["limited_by"] is None and s["e2e_speedup"] is None


@pytest.mark.parametrize("flags, needle", [
    (["--sizes", "abc"], "--sizes"),
    (["--sizes", "16"], "--sizes"),
    (["--loaders", "dali,ffcv"], "--loaders"),
    (["--steps", "0"], "--steps"),
    (["--repeats", "-1"], "--repeats"),
    (["--model", "convnext_nope"], "--model"),
    (["--sizes", "64", "--ablation-sizes", "96"], "--ablation-sizes"),
    (["--peak-tflops", "0"], "--peak-tflops"),
])
def test_bad_flags_exit_2_with_one_line(flags, needle, capsys, tmp_path):
    assert main(["benchmark", str(tmp_path), "--quick", *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("convnext-fast benchmark: error:") and needle in err


def test_missing_data_and_argparse_errors_exit_2(capsys, tmp_path):
    assert main(["benchmark", str(tmp_path / "nope"), "--quick"]) == 2
    assert "nope" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["benchmark", "--amp", "fp8"])
    assert e.value.code == 2


def test_engine_state_bytes_counts_weights_adam_moments_and_ema():
    from convnext_fast.benchmark.run import RECIPE, state_bytes
    from convnext_fast.engine import build_engine

    engine = build_engine("convnext_atto", 3, device="cpu", speed=BASELINE_SPEED, recipe=RECIPE)
    engine.train_step(torch.randn(2, 3, 32, 32), torch.tensor([0, 1]))  # creates AdamW's two moments
    params = sum(p.numel() for p in engine.model.parameters())
    # fp32 weights + exp_avg + exp_avg_sq + the EMA copy = 4 x 4 bytes per parameter (+ a few step counters).
    assert state_bytes(engine) == pytest.approx(16 * params, rel=0.01)


def test_resolve_data_reads_the_train_split_when_there_is_one(tmp_path):
    from convnext_fast.benchmark.run import resolve_data

    (tmp_path / "flat" / "a").mkdir(parents=True)
    (tmp_path / "split" / "train" / "a").mkdir(parents=True)
    (tmp_path / "split" / "val" / "a").mkdir(parents=True)
    assert resolve_data(str(tmp_path / "flat")) == (tmp_path / "flat", "")
    assert resolve_data(str(tmp_path / "split"))[0] == tmp_path / "split" / "train"
    with pytest.raises(ValueError, match="not a directory"):
        resolve_data(str(tmp_path / "missing"))


def test_schedule_projection_interpolates_unmeasured_sizes_in_pixels():
    from convnext_fast.benchmark.projection import project_schedule, rate_at
    from convnext_fast.schedule import ResolutionSchedule

    rates = {128: 400.0, 192: 100.0}
    assert rate_at(rates, 128) == (400.0, "measured")
    rate, how = rate_at(rates, 160)  # seconds per image linear in pixels between 128 and 192
    t = 1 / 400 + (1 / 100 - 1 / 400) * (160 ** 2 - 128 ** 2) / (192 ** 2 - 128 ** 2)
    assert how == "interpolated" and rate == pytest.approx(1 / t)
    assert rate_at(rates, 96) == (pytest.approx(400 * (128 / 96) ** 2), "extrapolated")
    records = [{"kind": "step", "name": "fast", "img_size": s, "samples_per_sec": r} for s, r in rates.items()]
    sched = ResolutionSchedule(img_size=192, epochs=8, start_size=128, ramp=(4, 6))  # 128 x4, 160, 192 x3
    assert sched.per_epoch == [128] * 4 + [160, 192, 192, 192]
    p = project_schedule(records, sched, 1000, "convnext_atto", 10)
    assert p["fixed_s"] == pytest.approx(8 * 1000 / 100)
    assert p["progressive_s"] == pytest.approx(4 * 1000 / 400 + 1000 * t + 3 * 1000 / 100)
    assert [s["epochs"] for s in p["per_size"]] == [4, 1, 3] and 0.4 < p["flops_ratio"] < 0.8
