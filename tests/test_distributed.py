"""Sharding and reduction under DDP, on the CPU (gloo): the pieces that make N ranks behave like one process.

- `epoch_indices`: train shards are disjoint, equal-sized multiples of the batch (every rank runs the same number
  of steps, so none waits at the end of an epoch), drop fewer than num_shards * batch_size samples, and come from
  one global permutation per epoch; eval shards hold every sample exactly once.
- `evaluate` (the train loop's evaluation) on 2 gloo processes, each on its eval shard, reports exactly what
  one process reports on the whole set, also when the shards are uneven or one rank has no sample at all.
- every backend (torchvision, dali, synthetic) shards by rank the same way: with one image per class, the labels
  a rank sees name the samples it got.
- `replica_digests`: the cross-rank weight check the train loop uses; equal digests on equal weights, different
  ones as soon as one rank's weights differ.
"""
from __future__ import annotations

import os
import socket

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from PIL import Image

from convnext_fast import distributed
from convnext_fast.data import DatasetError, build_loader, epoch_indices
from convnext_fast.evaluate import evaluate


def _train_shards(n, bs, ws, seed=0, epoch=0):
    return [epoch_indices(n, train=True, batch_size=bs, seed=seed, epoch=epoch, shard_id=r, num_shards=ws)
            for r in range(ws)]


CASES = [(n, bs, ws) for n in (1, 2, 5, 7, 10, 64, 101, 997) for bs in (1, 2, 3, 8, 32) for ws in (1, 2, 3, 4, 8)]


@pytest.mark.parametrize("n,bs,ws", CASES)
def test_train_shards_disjoint_equal_and_cover(n, bs, ws):
    if (n // ws) // bs == 0:  # not one full batch per rank: a clear user error, not an empty epoch or a hang
        with pytest.raises(DatasetError, match="--batch-size"):
            epoch_indices(n, train=True, batch_size=bs, shard_id=0, num_shards=ws)
        return
    for epoch in (0, 1):
        shards = _train_shards(n, bs, ws, seed=3, epoch=epoch)
        sizes = {len(s) for s in shards}
        assert len(sizes) == 1, f"unequal shards {[len(s) for s in shards]}: a rank would wait at the epoch end"
        size = sizes.pop()
        assert size > 0 and size % bs == 0  # drop_last: full, static-shape batches only
        flat = np.concatenate(shards)
        assert len(np.unique(flat)) == len(flat), "a sample is trained on by two ranks in one epoch"
        assert flat.min() >= 0 and flat.max() < n
        assert n - len(flat) < ws * bs  # only the tail that cannot fill one more step on every rank is dropped
        for s in shards:
            assert s.dtype == np.int64


@pytest.mark.parametrize("n,ws", [(0, 1), (1, 1), (1, 2), (3, 4), (5, 2), (7, 3), (100, 8), (101, 2), (997, 4)])
def test_eval_shards_hold_every_sample_exactly_once(n, ws):
    shards = [epoch_indices(n, train=False, batch_size=4, shard_id=r, num_shards=ws) for r in range(ws)]
    # In order, no padding, no duplicates: concatenating the rank-ordered shards gives back 0..n-1.
    np.testing.assert_array_equal(np.concatenate(shards), np.arange(n))
    assert max(map(len, shards)) - min(map(len, shards)) <= 1
    # Eval ignores seed/epoch: the same shards every epoch.
    again = [epoch_indices(n, train=False, batch_size=4, seed=9, epoch=5, shard_id=r, num_shards=ws)
             for r in range(ws)]
    for a, b in zip(shards, again):
        np.testing.assert_array_equal(a, b)


def test_shards_come_from_one_global_permutation_per_epoch():
    n, bs, ws = 103, 4, 4
    for epoch in range(3):
        shards = _train_shards(n, bs, ws, seed=11, epoch=epoch)
        # Every rank computes its shard alone; dealing one seeded permutation round-robin gives them all.
        perm = np.random.default_rng([11, epoch]).permutation(n)
        for r, s in enumerate(shards):
            np.testing.assert_array_equal(s, perm[r::ws][: len(s)])
        # A rank asked again (e.g. after a resume) gets the same shard: a pure function of (seed, epoch, rank).
        np.testing.assert_array_equal(shards[1], _train_shards(n, bs, ws, seed=11, epoch=epoch)[1])
    e0, e1 = _train_shards(n, bs, ws, seed=11, epoch=0), _train_shards(n, bs, ws, seed=11, epoch=1)
    assert not np.array_equal(e0[0], e1[0]), "the data is not reshuffled between epochs"
    assert not np.array_equal(e0[0], _train_shards(n, bs, ws, seed=12, epoch=0)[0]), "seed ignored"


def test_dropped_tail_rotates_so_every_sample_is_trained():
    n, bs, ws = 10, 2, 3  # 6 of 10 samples per epoch
    seen = set()
    for epoch in range(30):
        seen.update(np.concatenate(_train_shards(n, bs, ws, epoch=epoch)).tolist())
    assert seen == set(range(n))


def test_bad_shard_arguments_are_value_errors():
    with pytest.raises(ValueError, match="shard_id"):
        epoch_indices(10, train=True, batch_size=2, shard_id=2, num_shards=2)
    with pytest.raises(ValueError, match="batch size"):
        epoch_indices(10, train=False, batch_size=0)


N_SAMPLES = 11  # one image per class, so a label names a sample


@pytest.fixture(scope="module")
def one_image_per_class(tmp_path_factory):
    root = tmp_path_factory.mktemp("one_per_class")
    for c in range(N_SAMPLES):
        (root / f"c{c:02d}").mkdir()
        Image.fromarray(np.full((20, 24, 3), 20 * c, np.uint8)).save(root / f"c{c:02d}" / "x.png")
    return root


def _rank_loaders(root, backend, train, batch_size, world_size):
    return [build_loader(root, train=train, img_size=16, batch_size=batch_size, backend=backend, device="cpu",
                         seed=5, shard_id=r, num_shards=world_size, num_workers=0 if backend != "dali" else 1,
                         randaugment=None) for r in range(world_size)]


def _labels(loader) -> list[int]:
    out = []
    for images, labels in loader:
        assert images.shape[0] == labels.shape[0]
        out += labels.tolist()
    return out


@pytest.mark.parametrize("backend", ["torchvision", "dali"])
def test_backends_shard_by_rank(one_image_per_class, backend):
    ws, bs = 2, 2
    train = _rank_loaders(one_image_per_class, backend, True, bs, ws)
    try:
        per_epoch = []
        for epoch in (0, 1):
            seen = []
            for loader in train:
                loader.set_epoch(epoch)
                seen.append(_labels(loader))
            # 11 images, 2 ranks, batch 2: 4 each (2 steps), disjoint, the shards epoch_indices deals
            assert [len(s) for s in seen] == [4, 4] and [len(loader) for loader in train] == [2, 2]
            assert not set(seen[0]) & set(seen[1]), f"{backend}: ranks share samples {seen}"
            for r, s in enumerate(seen):
                assert sorted(s) == sorted(epoch_indices(N_SAMPLES, train=True, batch_size=bs, seed=5,
                                                         epoch=epoch, shard_id=r, num_shards=ws).tolist())
            per_epoch.append(seen)
        assert per_epoch[0] != per_epoch[1], f"{backend}: not reshuffled between epochs"
    finally:
        for loader in train:
            loader.close()
    val = _rank_loaders(one_image_per_class, backend, False, 4, ws)
    try:
        seen = [_labels(loader) for loader in val]
        assert [len(s) for s in seen] == [6, 5] and [loader.num_samples for loader in val] == [6, 5]
        assert seen[0] + seen[1] == list(range(N_SAMPLES)), f"{backend}: eval shards {seen}"
    finally:
        for loader in val:
            loader.close()


def test_synthetic_backend_shard_sizes_follow_epoch_indices():
    for n, ws, bs in ((9, 2, 2), (7, 3, 2), (1, 2, 4), (100, 8, 3)):
        for train in (True, False):
            if train and (n // ws) // bs == 0:
                continue
            loaders = [build_loader(None, train=train, img_size=8, batch_size=bs, backend="synthetic", device="cpu",
                                    shard_id=r, num_shards=ws, num_samples=n, num_classes=3) for r in range(ws)]
            counts = [sum(b.labels.numel() for b in loader) for loader in loaders]
            expected = [len(epoch_indices(n, train=train, batch_size=bs, shard_id=r, num_shards=ws))
                        for r in range(ws)]
            assert counts == expected == [loader.num_samples for loader in loaders], (n, ws, bs, train)


# ---------------------------------------------------------------------------------------------------------------
# Multi-process (gloo) tests. Children are started with torch.multiprocessing (spawn) and join the process group
# through the project's own init_distributed(), from the same environment variables torchrun sets.
# ---------------------------------------------------------------------------------------------------------------

NUM_CLASSES = 5


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _fake_eval_set(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and labels for n samples; the first part of the set is easy and the rest hard, so shards of
    different sizes have different accuracies and an average of per-rank averages would be wrong."""
    g = torch.Generator().manual_seed(1234)
    labels = torch.randint(0, NUM_CLASSES, (n,), generator=g)
    logits = torch.randn(n, NUM_CLASSES, generator=g)
    easy = torch.arange(n) < n // 3
    logits[easy] += 4.0 * torch.nn.functional.one_hot(labels[easy], NUM_CLASSES)
    return logits, labels


def _batches(logits, labels, positions, batch_size):
    """(images, labels) batches like an eval loader's: last partial batch kept. The 'images' are the logits."""
    return [(logits[positions[i:i + batch_size]], labels[positions[i:i + batch_size]])
            for i in range(0, len(positions), batch_size)]


def _init_child(rank: int, world_size: int, port: int) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    info = distributed.init_distributed("cpu", timeout_s=60)
    assert (info.rank, info.world_size, info.distributed) == (rank, world_size, world_size > 1)


EVAL_CASES = [(101, 8), (7, 2), (3, 2), (1, 4)]  # (n, eval batch): uneven shards; n=1 leaves rank 1 no batch


def _worker(rank, world_size, port, out_dir):
    """One gloo group, several checks (each spawn costs seconds of imports on a small CI machine)."""
    _init_child(rank, world_size, port)
    try:
        results = []
        for n, batch_size in EVAL_CASES:
            logits, labels = _fake_eval_set(n)
            pos = torch.from_numpy(epoch_indices(n, train=False, batch_size=batch_size, shard_id=rank,
                                                 num_shards=world_size))
            shard = _batches(logits, labels, pos, batch_size)
            out = evaluate({"model": lambda x: x.float()}, shard, num_classes=NUM_CLASSES, device="cpu")["model"]
            results.append({"result": out, "shard_size": len(pos)})
        digests = {}
        for perturb_rank in (None, 1):
            model = _tiny_model()
            if rank == perturb_rank:
                with torch.no_grad():  # the smallest possible drift: one float's last bit
                    w = model[0].weight.view(-1)
                    w[0] = torch.nextafter(w[0], torch.tensor(1e9))
            digests[perturb_rank] = distributed.replica_digests(model.state_dict())
        torch.save({"eval": results, "digests": digests}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        distributed.destroy_distributed()


def _tiny_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))


def _per_rank_top1(logits, labels, n, world_size):
    out = []
    for r in range(world_size):
        pos = torch.from_numpy(epoch_indices(n, train=False, batch_size=1, shard_id=r, num_shards=world_size))
        out.append(100.0 * (logits[pos].argmax(1) == labels[pos]).double().mean().item())
    return out


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """Run `_worker` on 2 gloo processes once; the per-rank outputs, indexed by rank."""
    out_dir = tmp_path_factory.mktemp("ranks")
    mp.spawn(_worker, args=(2, _free_port(), str(out_dir)), nprocs=2, join=True)
    return [torch.load(out_dir / f"rank{r}.pt") for r in range(2)]


@pytest.mark.parametrize("case", range(len(EVAL_CASES)))
def test_distributed_evaluation_equals_single_process(two_ranks, case):
    n, _ = EVAL_CASES[case]
    logits, labels = _fake_eval_set(n)
    single = evaluate({"model": lambda x: x.float()}, _batches(logits, labels, torch.arange(n), 16),
                      num_classes=NUM_CLASSES, device="cpu")["model"]
    assert single["count"] == n
    outs = [rank_out["eval"][case] for rank_out in two_ranks]
    sizes = [o["shard_size"] for o in outs]
    assert sum(sizes) == n and sizes[0] == sizes[1] + 1, "the test needs uneven shards"
    if n > 3:
        naive = sum(_per_rank_top1(logits, labels, n, 2)) / 2
        assert naive != pytest.approx(single["top1"], abs=1e-6), "the test needs shards whose accuracies differ"
    for o in outs:  # every rank reports the global numbers, not its shard's
        r = o["result"]
        assert r["count"] == n
        assert r["confusion"] == single["confusion"]
        assert r["top1"] == pytest.approx(single["top1"], abs=1e-9)
        assert r["top5"] == pytest.approx(single["top5"], abs=1e-9)
        assert r["per_class_acc"] == pytest.approx(single["per_class_acc"], abs=1e-9, nan_ok=True)
        # Sample-weighted over uneven batches; float32 batch means summed in another grouping: rel 1e-6.
        assert r["loss"] == pytest.approx(single["loss"], rel=1e-6)


def test_replica_digests_detect_diverged_weights(two_ranks):
    same, diverged = two_ranks[0]["digests"][None], two_ranks[0]["digests"][1]
    for rank_out in two_ranks:  # every rank gets every rank's digest
        assert rank_out["digests"] == {None: same, 1: diverged}
    assert len(same) == 2 and same[0] == same[1]
    assert diverged[0] != diverged[1]  # one bit of one weight on rank 1
    assert same[0] == diverged[0] == distributed.state_digest(_tiny_model().state_dict())


def test_state_digest_is_layout_independent_and_value_sensitive():
    sd = {"a": torch.randn(2, 3, 4, 5), "b": torch.arange(3)}
    cl = {"a": sd["a"].contiguous(memory_format=torch.channels_last), "b": sd["b"].clone()}
    assert distributed.state_digest(sd) == distributed.state_digest(cl)
    assert distributed.state_digest(sd) == distributed.state_digest(dict(reversed(list(sd.items()))))
    changed = {"a": sd["a"].clone(), "b": sd["b"]}
    changed["a"][1, 2, 3, 4] += 1e-6
    assert distributed.state_digest(sd) != distributed.state_digest(changed)
    renamed = {"c": sd["a"], "b": sd["b"]}
    assert distributed.state_digest(sd) != distributed.state_digest(renamed)
    assert distributed.replica_digests(sd) == [distributed.state_digest(sd)]  # single process: no group needed


def test_build_engine_keeps_the_callers_per_rank_rng_stream():
    """The loop seeds each rank differently (seed + rank) so drop path draws different masks per rank; building
    the engine must fix the initial weights without resetting that stream."""
    from convnext_fast.config import SpeedConfig
    from convnext_fast.engine import build_engine

    weights, draws = [], []
    for rank_seed in (0, 1):
        torch.manual_seed(rank_seed)
        expected = torch.rand(4)
        torch.manual_seed(rank_seed)
        engine = build_engine("convnext_atto", 3, device="cpu", speed=SpeedConfig(compile=False), seed=7)
        draws.append(torch.rand(4))
        assert torch.equal(draws[-1], expected), "build_engine reset the caller's RNG stream"
        weights.append(distributed.state_digest(engine.model.state_dict()))
    assert weights[0] == weights[1], "initial weights must not depend on the rank's stream"
    assert not torch.equal(draws[0], draws[1])
