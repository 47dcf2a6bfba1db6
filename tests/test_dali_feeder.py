"""The DALI loader's feeder thread (host work off the training thread): same batches as feeding inline, errors at
their batch, no thread left behind after an early break, close() or interpreter exit. CPU, tiny images."""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("nvidia.dali")

from convnext_fast.data import DatasetError, ImageIndex, build_loader, epoch_indices, scan_folder  # noqa: E402
from convnext_fast.data.prefetch import Prefetcher  # noqa: E402
from test_dali import _corrupt_png  # noqa: E402  (tests/ is on sys.path: pytest's rootdir import)

pytestmark = pytest.mark.timeout(300)
B = 4


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """2 classes x 8 textured JPEGs of assorted sizes."""
    root = tmp_path_factory.mktemp("feeder")
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (root / c).mkdir()
        for i in range(8):
            w, h = [(48, 40), (40, 56), (64, 64), (37, 45)][i % 4]
            Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(root / c / f"{i}.jpg", quality=90)
    return root


def _loader(root, **kw):
    args = dict(train=True, img_size=24, batch_size=B, backend="dali", device="cpu", num_workers=2)
    args.update(kw)
    return build_loader(root, **args)


def _feeders() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "dali-feed" and t.is_alive()]


def _epochs(ld, epochs=(0, 1)):
    out = []
    for e in epochs:
        ld.set_epoch(e)
        out += [(b.images, b.labels) for b in ld]
    return out


@pytest.mark.parametrize("cache", ["off", "host"])
def test_batches_are_the_same_with_the_feeder_thread_and_inline(root, cache):
    """feed_ahead=0 feeds on the consumer's thread (the reference); the thread changes where, not what."""
    kw = dict(randaugment=(2, 9), reprob=0.5, seed=3, num_shards=2, shard_id=1, cache=cache)
    inline, threaded = _loader(root, feed_ahead=0, **kw), _loader(root, feed_ahead=2, **kw)
    a, b = _epochs(inline), _epochs(threaded)
    inline.close(), threaded.close()
    assert len(a) == len(b) == 2 * 2
    for (xa, ya), (xb, yb) in zip(a, b):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


def _bad_header_index(root: Path, tmp_path: Path, batch: int) -> tuple[ImageIndex, str]:
    """A copy of the index whose sample at epoch 0's batch `batch` has a header PIL cannot read."""
    index = scan_folder(root)
    pos = epoch_indices(len(index), train=True, batch_size=B, seed=0, epoch=0, shard_id=0, num_shards=1)
    victim = int(pos[batch * B + 1])
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    samples = list(index.samples)
    samples[victim] = (str(bad), samples[victim][1])
    return ImageIndex(index.root, index.classes, index.class_to_idx, samples), str(bad)


def test_unreadable_file_in_a_prefetched_batch_surfaces_at_that_batch(root, tmp_path):
    index, bad = _bad_header_index(root, tmp_path, batch=2)
    ld = _loader(index, randaugment=None, feed_ahead=3)  # the feeder reads batch 2 long before it is due
    for _ in range(2):  # and the loader stays usable and honest
        got = []
        with pytest.raises(DatasetError, match=bad):
            for batch in ld:
                got.append(batch)
        assert len(got) == 2  # batches 0 and 1 first: not earlier, not later
        assert not _feeders()
    ld.close()


def test_decode_error_in_a_prefetched_batch_names_the_file_at_that_batch(root, tmp_path):
    index = scan_folder(root)
    bad = tmp_path / "corrupt.png"
    _corrupt_png(bad)
    samples = list(index.samples)
    samples[9] = (str(bad), samples[9][1])  # eval order is the index order: batch 2
    ld = _loader(ImageIndex(index.root, index.classes, index.class_to_idx, samples), train=False)
    got = []
    with pytest.raises(DatasetError, match=str(bad)):
        for batch in ld:
            got.append(batch)
    assert len(got) == 2
    assert not _feeders()
    ld.close()


def test_early_break_and_close_stop_the_feeder_thread(root):
    ld = _loader(root, randaugment=(2, 9))
    for _ in ld:
        assert len(_feeders()) == 1  # the epoch runs on its own thread
        break
    assert not _feeders()  # the abandoned epoch's thread stopped (and drained the pipeline)
    assert len(list(ld)) == len(ld)  # the next epoch is whole

    it = iter(ld)
    next(it)
    ld.close()  # mid-epoch, the consumer still holding its iterator
    assert not _feeders()
    with pytest.raises(StopIteration):
        next(it)
    assert len(list(ld)) == len(ld)  # iterating again rebuilds the pipeline
    ld.close()


def test_interpreter_exits_with_an_epoch_left_running(root):
    """A loader dropped mid-epoch, never closed: the process still exits promptly (daemon thread, no deadlock)."""
    code = ("import sys; from convnext_fast.data import build_loader\n"
            f"ld = build_loader({str(root)!r}, train=True, img_size=24, batch_size=4, backend='dali', device='cpu',"
            " num_workers=2, feed_ahead=1)\n"
            "it = iter(ld); next(it); print('one batch', flush=True); sys.exit(0)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "one batch" in proc.stdout


def test_prefetcher_order_errors_and_stop():
    def items(fail_at=None):
        for i in range(5):
            if i == fail_at:
                raise KeyError(f"item {i}")
            yield i

    assert list(Prefetcher(items(), 2)) == list(range(5))
    got = []
    with pytest.raises(KeyError, match="item 3"):
        for x in Prefetcher(items(fail_at=3), 2):
            got.append(x)
    assert got == [0, 1, 2]

    stopped = threading.Event()

    def endless():
        try:
            while True:
                yield 1
        finally:
            stopped.set()  # runs on the producer's thread when it stops

    p = Prefetcher(endless(), 2, name="t-endless")
    next(p)
    assert p.close(timeout=10) and not p.alive and stopped.is_set()
