"""The DALI feeder's batches reach the consumer's stream, whichever it is (torch's current stream is per thread).

On the CPU: the hand-over plumbing with a fake CUDA (per-thread current streams, events, record_stream): the
feeder thread works on the loader's side stream, and each batch is handed to the stream current on the consumer's
thread when it takes the batch. On a GPU: the loader iterated under `with torch.cuda.stream(s)` gives the same
batches as under the default stream, with both the default and the feeder's stream kept busy to widen any race."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from PIL import Image

from convnext_fast.data.prefetch import Prefetcher
from convnext_fast.data.streams import StreamHandoff

CUDA = torch.device("cuda", 0)


class _Stream:
    def __init__(self, name: str):
        self.name, self.waited = name, []

    def wait_event(self, event) -> None:
        self.waited.append(event)


class _Event:
    def __init__(self):
        self.stream = None

    def record(self, stream) -> None:
        self.stream = stream


class _Tensor:
    def __init__(self):
        self.used_on = []

    def record_stream(self, stream) -> None:
        self.used_on.append(stream)


@pytest.fixture
def fake_cuda(monkeypatch):
    """torch.cuda's stream calls, with torch's per-thread current stream."""
    local, default = threading.local(), _Stream("default")
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: getattr(local, "stream", default))
    monkeypatch.setattr(torch.cuda, "set_stream", lambda s: setattr(local, "stream", s))
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: None)
    monkeypatch.setattr(torch.cuda, "Stream", lambda device=None: _Stream("side"))
    monkeypatch.setattr(torch.cuda, "Event", _Event)
    return local


def test_feeder_works_on_the_side_stream_and_hands_batches_to_the_consumers(fake_cuda):
    user = _Stream("user")
    torch.cuda.set_stream(user)  # the consumer's thread runs under its own stream (`with torch.cuda.stream(s)`)
    handoff = StreamHandoff(CUDA)
    seen = []

    def produce():
        for _ in range(3):
            seen.append((threading.current_thread().name, torch.cuda.current_stream(CUDA), handoff.stream()))
            yield [_Tensor(), _Tensor()], handoff.ready()

    got = []
    for batch, ready in Prefetcher(produce(), 2, name="feeder", setup=handoff.feeder_setup):
        handoff.receive(batch, ready)
        got.append((batch, ready))
    assert seen == [("feeder", handoff.side, handoff.side)] * 3  # not the default, not the user's
    assert all(ready.stream is handoff.side for _, ready in got)  # each batch's event: after its own work
    assert user.waited == [ready for _, ready in got]  # the consumer's stream waits for each, in order
    assert all(t.used_on == [user] for batch, _ in got for t in batch)  # memory kept until the user's work ran
    assert torch.cuda.current_stream(CUDA) is user and handoff.side.waited == []


def test_the_stream_is_read_when_the_consumer_takes_each_batch(fake_cuda):
    handoff = StreamHandoff(CUDA)
    first, second = _Stream("first"), _Stream("second")
    batches = Prefetcher(iter([([_Tensor()], handoff.ready()), ([_Tensor()], handoff.ready())]), 1,
                         setup=handoff.feeder_setup)
    for stream in (first, second):
        torch.cuda.set_stream(stream)
        handoff.receive(*next(batches))
    assert len(first.waited) == len(second.waited) == 1


def test_inline_and_cpu_hand_overs_change_nothing(fake_cuda):
    user = _Stream("user")
    torch.cuda.set_stream(user)
    inline = StreamHandoff(CUDA, threaded=False)  # feed_ahead=0: the producer runs on the consumer's thread
    inline.feeder_setup()
    assert inline.side is None and inline.stream() is user and inline.ready() is None
    inline.receive([_Tensor()], None)
    assert user.waited == [] and torch.cuda.current_stream(CUDA) is user
    cpu = StreamHandoff(torch.device("cpu"))
    assert cpu.side is None and cpu.stream() is None and cpu.ready() is None


@pytest.mark.gpu
def test_batches_under_a_side_stream_equal_the_default_streams(tmp_path):
    pytest.importorskip("nvidia.dali", reason="needs NVIDIA DALI, which is not installed here")
    from convnext_fast.data import build_loader

    rng = np.random.default_rng(0)
    for c in ("a", "b", "c"):
        (tmp_path / c).mkdir()
        for i in range(16):
            Image.fromarray(rng.integers(0, 255, (48, 56, 3), dtype=np.uint8)).save(tmp_path / c / f"{i}.jpg")
    kw = dict(train=True, img_size=64, batch_size=8, backend="dali", device="cuda", randaugment=(2, 9), reprob=1.0)
    ref_loader = build_loader(tmp_path, **kw)
    ref = [(x.clone(), y.clone()) for x, y in ref_loader]
    ref_loader.close()
    torch.cuda.synchronize()

    ld, side = build_loader(tmp_path, **kw), torch.cuda.Stream()
    got = []
    with torch.cuda.stream(side):
        for x, y in ld:
            got.append((x.clone(), y.clone()))  # read at once, on the user's stream
            # Keep the other streams busy (the default one, the feeder's): work queued there now runs late, after
            # any read that did not wait for it.
            for busy in (torch.cuda.default_stream(), getattr(ld, "_side_stream", None)):
                if busy is not None:
                    with torch.cuda.stream(busy):
                        torch.cuda._sleep(20_000_000)
    ld.close()
    torch.cuda.synchronize()
    assert len(got) == len(ref) == 6
    for (x, y), (rx, ry) in zip(got, ref):
        assert torch.equal(y, ry)
        # nvJPEG's hardware and CUDA decoders may round differently from run to run; a race reads garbage.
        assert float((x.float() - rx.float()).abs().mean()) < 0.01
