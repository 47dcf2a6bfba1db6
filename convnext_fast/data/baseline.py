"""The torchvision baseline: what users run today, kept faithful so the benchmark's "x faster" is honest.

An ImageFolder-style dataset (PIL open + ``convert("RGB")``, as ``torchvision.datasets.folder.pil_loader``),
the standard torchvision transforms (those of torchvision's classification reference recipe) and a
``DataLoader`` with worker processes, pinned memory on CUDA and persistent workers. Batches are moved to the
device, converted to channels_last and ``cfg.dtype`` in the main process after collation, as a typical
training loop does.

Two deliberate differences from a plain ``DataLoader(ImageFolder(...), shuffle=True)``, both needed by the
loader contract and both negligible in cost:
  - the sampler yields ``epoch_indices(...)`` for (seed, epoch, shard), so shuffling and sharding match the
    other backends exactly;
  - each sample's random augmentation is seeded from (seed, epoch, position), so the batches of an epoch are
    a pure function of (seed, epoch, shard), independent of the worker count and of earlier epochs (the
    worker-seeding of a persistent ``DataLoader`` would otherwise carry RNG state from epoch to epoch).
"""

from __future__ import annotations

from typing import Iterator

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, get_worker_info
from torchvision import transforms as T

from convnext_fast.data import Batch, DatasetError, ImageIndex, LoaderConfig, epoch_indices
from convnext_fast.data.badfiles import BadFiles

_BILINEAR = T.InterpolationMode.BILINEAR


def build_transform(cfg: LoaderConfig, size: int | None = None) -> T.Compose:
    """torchvision's reference classification transforms for ``cfg`` (train or eval) at ``size`` (default
    ``cfg.img_size``)."""
    size = cfg.img_size if size is None else int(size)
    if not cfg.train:
        return T.Compose([
            T.Resize(int(size / cfg.crop_pct), interpolation=_BILINEAR, antialias=True),
            T.CenterCrop(size),
            T.ToTensor(),
            T.Normalize(cfg.mean, cfg.std),
        ])
    ops: list = [T.RandomResizedCrop(size, scale=cfg.scale, ratio=cfg.ratio, interpolation=_BILINEAR,
                                     antialias=True)]
    if cfg.hflip > 0:
        ops.append(T.RandomHorizontalFlip(cfg.hflip))
    if cfg.randaugment is not None:
        num_ops, magnitude = cfg.randaugment
        ops.append(T.RandAugment(num_ops, magnitude, num_magnitude_bins=31, interpolation=_BILINEAR))
    ops += [T.ToTensor(), T.Normalize(cfg.mean, cfg.std)]
    if cfg.reprob > 0:
        ops.append(T.RandomErasing(p=cfg.reprob))
    return T.Compose(ops)


def load_rgb(path: str, bad: BadFiles | None = None) -> Image.Image:
    """``pil_loader`` of ImageFolder, with decode failures turned into a DatasetError naming the file (and, given
    `bad`, the flag that skips it)."""
    try:
        with open(path, "rb") as f:
            img = Image.open(f)
            return img.convert("RGB")
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError, ...
        why = f"{type(e).__name__}: {e}"
        raise (bad.error(path, why) if bad else DatasetError(f"cannot read image {path}: {why}")) from e


def _sample_seed(seed: int, epoch: int, position: int) -> int:
    return int(np.random.SeedSequence([seed, epoch, position]).generate_state(1, np.uint64)[0] >> 1)


class FolderDataset(Dataset):
    """Items are keyed by ``(position, epoch, size)`` from the sampler; returns ``(image tensor, class index)``.

    The size travels with the key (not as dataset state) so persistent workers, which hold their own copy of
    the dataset, follow a progressive schedule from the first batch of each epoch.
    """

    def __init__(self, samples: list[tuple[str, int]], cfg: LoaderConfig, bad: BadFiles | None = None):
        self.samples = samples
        self.cfg = cfg
        self.seed = cfg.seed
        self.train = cfg.train
        self._transforms: dict[int, T.Compose] = {}
        self.bad = bad or BadFiles([p for p, _ in samples], skip=False, log=None)

    def _load(self, position: int) -> tuple[Image.Image, int]:
        """The image at `position`, or (skipping bad files) at its deterministic replacement (data/badfiles.py).
        Each worker finds the same replacement: the first position after it that loads."""
        pos = self.bad.replacement(position)
        while True:
            path, target = self.samples[pos]
            try:
                return load_rgb(path, self.bad), target
            except DatasetError as e:
                if not self.bad.skip:
                    raise
                self.bad.add(pos, e.why)
                pos = self.bad.replacement(pos)

    def __len__(self) -> int:
        return len(self.samples)

    def transform(self, size: int) -> T.Compose:
        if size not in self._transforms:
            self._transforms[size] = build_transform(self.cfg, size)
        return self._transforms[size]

    def __getitem__(self, key: tuple[int, int, int]) -> tuple[torch.Tensor, int]:
        position, epoch, size = key
        img, target = self._load(position)
        transform = self.transform(size)
        if not self.train:  # eval transforms are deterministic
            return transform(img), target
        # torchvision transforms draw from torch's global RNG. A worker process owns its RNG; in the main
        # process (num_workers=0) fork it so the caller's RNG stream is left untouched.
        in_worker = get_worker_info() is not None
        with torch.random.fork_rng(devices=[], enabled=not in_worker):
            torch.manual_seed(_sample_seed(self.seed, epoch, position))
            return transform(img), target


class _EpochSampler:
    """Yields ``(position, epoch, size)`` for the current epoch; read by the DataLoader in the main process."""

    def __init__(self, n: int, cfg: LoaderConfig):
        self.n, self.cfg, self.epoch = n, cfg, 0
        self.positions = self._positions()

    def _positions(self) -> np.ndarray:
        c = self.cfg
        return epoch_indices(self.n, train=c.train, batch_size=c.batch_size, seed=c.seed, epoch=self.epoch,
                             shard_id=c.shard_id, num_shards=c.num_shards)

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch = epoch
            self.positions = self._positions()

    def __len__(self) -> int:
        return len(self.positions)

    def __iter__(self) -> Iterator[tuple[int, int, int]]:
        epoch, size = self.epoch, self.cfg.size_at(self.epoch)
        return ((int(p), epoch, size) for p in self.positions)


def _unwrap(err: DatasetError) -> DatasetError:
    """A DatasetError re-raised from a worker carries the worker's whole traceback; keep the original message."""
    msg = str(err)
    marker = "DatasetError: "
    if "Original Traceback" in msg and marker in msg:
        msg = msg[msg.rindex(marker) + len(marker):].rstrip()
    return DatasetError(msg)


class TorchvisionLoader:
    """The loader protocol (see ``convnext_fast.data``) over a torchvision ``DataLoader``."""

    def __init__(self, index: ImageIndex, cfg: LoaderConfig):
        self.cfg = cfg
        self.classes = list(index.classes)
        self.class_to_idx = dict(index.class_to_idx)
        self._sampler = _EpochSampler(len(index), cfg)
        self.num_samples = len(self._sampler)
        bad = BadFiles([p for p, _ in index.samples], skip=cfg.skip_bad, log=cfg.bad_files_log)
        dataset = FolderDataset(list(index.samples), cfg, bad)
        workers = cfg.num_workers
        self._loader = DataLoader(
            dataset, batch_size=cfg.batch_size, sampler=self._sampler, num_workers=workers,
            pin_memory=cfg.device.type == "cuda", drop_last=cfg.train, persistent_workers=workers > 0,
            prefetch_factor=2 if workers > 0 else None,
            # A private generator: starting an epoch draws the workers' base seed from it, not from torch's
            # global RNG, so iterating never shifts the caller's random stream.
            generator=torch.Generator().manual_seed(cfg.seed),
        )

    def __len__(self) -> int:
        return len(self._loader)

    @property
    def img_size(self) -> int:
        """This epoch's output size (the schedule's, set by `set_epoch`)."""
        return self.cfg.size_at(self._sampler.epoch)

    def set_epoch(self, epoch: int) -> None:
        self._sampler.set_epoch(int(epoch))

    def __iter__(self) -> Iterator[Batch]:
        device, dtype = self.cfg.device, self.cfg.dtype
        it = iter(self._loader)
        while True:
            try:
                images, labels = next(it)
            except StopIteration:
                return
            except DatasetError as e:
                raise _unwrap(e) from None
            images = images.to(device, non_blocking=True)
            images = images.to(dtype=dtype, memory_format=torch.channels_last)
            yield Batch(images, labels.to(device, non_blocking=True))

    def close(self) -> None:
        """Stop the persistent workers now rather than at garbage collection."""
        it = getattr(self._loader, "_iterator", None)
        if it is not None and hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()
        self._loader._iterator = None


def build(index: ImageIndex, cfg: LoaderConfig) -> TorchvisionLoader:
    """Registry entry for ``backend="torchvision"``."""
    if index is None:
        raise ValueError("backend 'torchvision' needs an image folder")
    return TorchvisionLoader(index, cfg)
