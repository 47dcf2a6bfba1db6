"""Synthetic backend: random batches already on the device, the training step's throughput ceiling.

A few distinct batches per epoch are drawn once (seeded by seed, epoch and shard) and replayed, so iterating
costs nothing on the host or the device: what remains is the step itself.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np
import torch

from convnext_fast.data import Batch, ImageIndex, LoaderConfig

DISTINCT_BATCHES = 2


class SyntheticLoader:
    def __init__(self, cfg: LoaderConfig, classes: list[str], num_samples_total: int):
        self.cfg = cfg
        self.classes = list(classes)
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}
        per_shard = num_samples_total // cfg.num_shards
        if cfg.train:
            self._len = per_shard // cfg.batch_size
            self.num_samples = self._len * cfg.batch_size
        else:
            # epoch_indices' eval blocks: the first (total % shards) shards hold one more, so the shards sum to
            # the total (every sample once); a shard may be empty when there are fewer samples than ranks.
            self.num_samples = per_shard + int(cfg.shard_id < num_samples_total % cfg.num_shards)
            self._len = -(-self.num_samples // cfg.batch_size)
        if self._len == 0 and cfg.train:
            raise ValueError(f"synthetic loader: {num_samples_total} samples are too few for batch size "
                             f"{cfg.batch_size} on {cfg.num_shards} shard(s)")
        self._epoch = 0
        self._batches: list[Batch] | None = None

    def __len__(self) -> int:
        return self._len

    @property
    def img_size(self) -> int:
        """This epoch's output size (the schedule's, set by `set_epoch`)."""
        return self.cfg.size_at(self._epoch)

    def set_epoch(self, epoch: int) -> None:
        if epoch != self._epoch:
            self._epoch = epoch
            self._batches = None

    def _make_batches(self) -> list[Batch]:
        cfg = self.cfg
        seed = np.random.SeedSequence([cfg.seed, self._epoch, cfg.shard_id]).generate_state(1)[0]
        g = torch.Generator().manual_seed(int(seed))
        out = []
        for _ in range(min(DISTINCT_BATCHES, self._len)):
            images = torch.randn(cfg.batch_size, 3, self.img_size, self.img_size, generator=g)
            labels = torch.randint(0, len(self.classes), (cfg.batch_size,), generator=g)
            images = images.to(cfg.device, cfg.dtype).contiguous(memory_format=torch.channels_last)
            out.append(Batch(images, labels.to(cfg.device)))
        return out

    def __iter__(self) -> Iterator[Batch]:
        if self._batches is None:
            self._batches = self._make_batches()
        for i in range(self._len):
            batch = self._batches[i % len(self._batches)]
            if not self.cfg.train and i == self._len - 1:
                rest = self.num_samples - i * self.cfg.batch_size  # eval keeps the last partial batch
                batch = Batch(batch.images[:rest], batch.labels[:rest])
            yield batch

    def close(self) -> None:
        self._batches = None


def build(index: ImageIndex | None, cfg: LoaderConfig) -> SyntheticLoader:
    """With an index: its classes and size. Without: options num_classes (21) and num_samples (70000)."""
    if index is not None:
        return SyntheticLoader(cfg, index.classes, len(index))
    num_classes = int(cfg.option("num_classes", 21))
    return SyntheticLoader(cfg, [f"class_{i}" for i in range(num_classes)], int(cfg.option("num_samples", 70000)))
