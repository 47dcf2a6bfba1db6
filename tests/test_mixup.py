import numpy as np
import pytest
import torch

from convnext_fast.mixup import DeviceMixup

C = 7


def _batch(b=8, s=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(b, 3, s, s, generator=g).contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, C, (b,), generator=g)
    return images, labels


def _draw(mix, n, seed=0):
    out = []
    for i in range(n):
        images, labels = _batch(seed=seed + i)
        out.append(mix(images, labels))
    return out


def test_soft_targets_sum_to_one_and_mix_the_flipped_labels():
    mix = DeviceMixup(C, seed=1)
    mixed_some = False
    for images, labels in [_batch(seed=i) for i in range(10)]:
        out, t = mix(images.clone(), labels)
        assert t.dtype == torch.float32 and t.shape == (8, C)
        torch.testing.assert_close(t.sum(1), torch.ones(8))
        lam, off = mix.last_lam, 0.1 / C
        expected = torch.full((8, C), off)
        expected[torch.arange(8), labels] += lam * 0.9
        expected[torch.arange(8), labels.flip(0)] += (1 - lam) * 0.9
        torch.testing.assert_close(t, expected)
        mixed_some |= lam < 1
    assert mixed_some


def test_no_mixing_gives_smoothed_one_hot_and_leaves_images():
    for kwargs in ({"mixup_alpha": 0.0, "cutmix_alpha": 0.0}, {"prob": 0.0}):
        mix = DeviceMixup(C, smoothing=0.1, **kwargs)
        images, labels = _batch()
        ref = images.clone()
        out, t = mix(images, labels)
        assert torch.equal(out, ref) and mix.last_lam == 1.0
        assert torch.allclose(t[torch.arange(8), labels], torch.full((8,), 1 - 0.1 + 0.1 / C))
        assert torch.allclose(t.sum(1), torch.ones(8))
        assert ((t == 0.1 / C).sum(1) == C - 1).all()


def test_mixup_blend_is_lam_weighted():
    mix = DeviceMixup(C, mixup_alpha=1.0, cutmix_alpha=0.0, seed=3)
    images, labels = _batch()
    ref = images.clone()
    out, _ = mix(images, labels)
    lam = mix.last_lam
    assert 0 < lam < 1
    torch.testing.assert_close(out, lam * ref + (1 - lam) * ref.flip(0))
    assert out.data_ptr() == images.data_ptr()  # in place


def test_cutmix_lambda_equals_kept_area():
    mix = DeviceMixup(8, mixup_alpha=0.0, cutmix_alpha=1.0, smoothing=0.0, seed=4)
    lams = []
    for i in range(20):
        # distinct constant images: each pixel tells which sample it came from
        s = 13  # odd size exercises the border clipping and rounding
        ids = torch.arange(8, dtype=torch.float32) + 1
        images = ids.view(8, 1, 1, 1).expand(8, 3, s, s).contiguous()
        labels = torch.arange(8)  # distinct labels: the target weight of the own label is lambda
        out, t = mix(images, labels)
        kept = (out == ids.view(8, 1, 1, 1)).float().mean(dim=(1, 2, 3))
        from_flipped = (out == ids.flip(0).view(8, 1, 1, 1)).float().mean(dim=(1, 2, 3))
        torch.testing.assert_close(kept + from_flipped, torch.ones(8))
        torch.testing.assert_close(kept, torch.full((8,), mix.last_lam))
        torch.testing.assert_close(t[torch.arange(8), labels], torch.full((8,), mix.last_lam))
        lams.append(mix.last_lam)
    assert min(lams) < 0.9 and len(set(lams)) > 5


def test_determinism_by_seed_and_state_round_trip():
    a = _draw(DeviceMixup(C, seed=5), 6)
    b = _draw(DeviceMixup(C, seed=5), 6)
    c = _draw(DeviceMixup(C, seed=6), 6)
    for (ia, ta), (ib, tb) in zip(a, b):
        assert torch.equal(ia, ib) and torch.equal(ta, tb)
    assert any(not torch.equal(ta, tc) for (_, ta), (_, tc) in zip(a, c))

    uninterrupted = DeviceMixup(C, seed=7)
    first = DeviceMixup(C, seed=7)
    _draw(uninterrupted, 3)
    _draw(first, 3)
    state = first.state_dict()
    torch.save(state, "/dev/null")  # picklable
    resumed = DeviceMixup(C, seed=7)
    resumed.load_state_dict(torch.load(_roundtrip(state), weights_only=True))
    lams = []
    for (ia, ta), (ib, tb) in zip(_draw(uninterrupted, 4, seed=3), _draw(resumed, 4, seed=3)):
        assert torch.equal(ia, ib) and torch.equal(ta, tb)
        lams.append(resumed.last_lam)
    fresh = DeviceMixup(C, seed=7)  # without the state it would replay batches 0..3 instead of 3..6
    fresh_lams = []
    for i in range(4):
        fresh(*_batch(seed=3 + i))
        fresh_lams.append(fresh.last_lam)
    assert fresh_lams != lams


def test_rank0_state_resumes_every_rank():
    """Per-rank seeds [seed, rank]; the checkpoint holds rank 0's state only."""
    ranks = [DeviceMixup(C, seed=[7, r]) for r in range(2)]
    for m in ranks:
        _draw(m, 3)
    saved = ranks[0].state_dict()
    expected = [[t for _, t in _draw(m, 3, seed=3)] for m in ranks]
    assert not all(torch.equal(a, b) for a, b in zip(*expected))  # ranks draw different lambdas
    for r in range(2):
        resumed = DeviceMixup(C, seed=[7, r])
        resumed.load_state_dict(saved)
        assert all(torch.equal(a, b) for a, b in zip(expected[r], [t for _, t in _draw(resumed, 3, seed=3)]))


def _roundtrip(state):
    import io

    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return buf


def test_global_numpy_rng_untouched():
    np.random.seed(0)
    expected = np.random.rand()
    np.random.seed(0)
    _draw(DeviceMixup(C, seed=0), 4)
    assert np.random.rand() == expected


def test_call_never_syncs_with_device(monkeypatch):
    def forbidden(*a, **k):
        raise AssertionError("host sync in DeviceMixup.__call__")

    for name in ("item", "cpu", "tolist", "numpy", "__bool__", "__float__", "__int__"):
        monkeypatch.setattr(torch.Tensor, name, forbidden)
    for kwargs in ({}, {"mixup_alpha": 0.0}, {"cutmix_alpha": 0.0}, {"prob": 0.0}):
        _draw(DeviceMixup(C, seed=8, **kwargs), 4)


def test_odd_batch_and_bad_args():
    images, labels = _batch(b=5)
    _, t = DeviceMixup(C, seed=0)(images, labels)
    assert torch.allclose(t.sum(1), torch.ones(5))
    with pytest.raises(ValueError, match="smoothing"):
        DeviceMixup(C, smoothing=1.5)
    with pytest.raises(ValueError, match="labels"):
        DeviceMixup(C)(images, labels[:3])
    with pytest.raises(ValueError, match="DeviceMixup state"):
        DeviceMixup(C).load_state_dict({"foo": 1})
    with pytest.raises(ValueError, match="seed"):
        DeviceMixup(C, seed=-1)


@pytest.mark.gpu
def test_cuda_call_never_syncs():
    mix = DeviceMixup(C, seed=0)
    images, labels = _batch()
    images, labels = images.cuda(), labels.cuda()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # raises on any device->host wait
    try:
        for _ in range(8):
            _, t = mix(images, labels)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert t.device.type == "cuda" and torch.allclose(t.sum(1), torch.ones(8, device="cuda"))
