"""The data side: image folder -> normalized, channels-last batches on the device.

One contract, three backends (see `build_loader`):
  - "dali": the product; decode + augment on the GPU (the same graph on the CPU without one);
  - "torchvision": the baseline users run today (ImageFolder-style dataset + PIL transforms + DataLoader);
  - "synthetic": random batches already on the device: the training step's throughput ceiling.
Every loader yields `Batch(images, labels)` and has `len()`, `classes`, `class_to_idx`, `num_samples`,
`set_epoch(e)` and `close()`. The batches of an epoch are a pure function of (seed, epoch, shard), so a resumed
run only needs `set_epoch`.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, NamedTuple, Protocol

import torch

from convnext_fast.schedule import ResolutionSchedule
from convnext_fast.data.index import (
    IMG_EXTENSIONS,
    DatasetError,
    ImageIndex,
    epoch_indices,
    find_classes,
    scan_folder,
    stratified_split,
)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

__all__ = [
    "BACKENDS", "BackendUnavailable", "Batch", "DatasetError", "IMAGENET_MEAN", "IMAGENET_STD", "IMG_EXTENSIONS",
    "ImageIndex", "Loader", "LoaderConfig", "build_loader", "default_num_workers", "epoch_indices", "find_classes",
    "resolve_device", "scan_folder", "stratified_split",
]


class BackendUnavailable(ValueError):
    """A loader backend whose library is not installed (DALI). A ValueError: on the command line, one line. Tools
    that measure several backends catch it to record "<backend>: not installed (<reason>)" and go on."""

    def __init__(self, backend: str, reason: str, hint: str = ""):
        self.backend, self.reason = backend, reason
        self.status = f"{backend}: not installed ({reason})"
        super().__init__(f"--loader {self.status}" + (f"; {hint}" if hint else ""))


class Batch(NamedTuple):
    """Unpacks like a DataLoader's `(images, labels)`, so it is a drop-in."""

    images: torch.Tensor  # [B, 3, S, S], normalized, channels_last, on the target device
    labels: torch.Tensor  # [B] int64, same device


class Loader(Protocol):
    classes: list[str]
    class_to_idx: dict[str, int]
    num_samples: int  # samples per epoch on this shard

    def __iter__(self) -> Iterator[Batch]: ...
    def __len__(self) -> int: ...
    def set_epoch(self, epoch: int) -> None: ...
    def close(self) -> None: ...


@dataclass(frozen=True)
class LoaderConfig:
    """Everything a backend needs besides the index. Built by `build_loader`; backends never see other config."""

    train: bool
    img_size: int
    batch_size: int
    device: torch.device
    seed: int = 0
    shard_id: int = 0
    num_shards: int = 1
    scale: tuple[float, float] = (0.08, 1.0)  # random-resized-crop area fraction
    ratio: tuple[float, float] = (3 / 4, 4 / 3)  # random-resized-crop aspect ratio
    hflip: float = 0.5  # horizontal flip probability
    randaugment: tuple[int, int] | None = (2, 9)  # (num_ops, magnitude on torchvision's 0..30 scale); None = off
    reprob: float = 0.0  # random erasing probability
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    crop_pct: float = 0.875  # eval: resize shorter side to img_size / crop_pct, then center-crop img_size
    dtype: torch.dtype = torch.float32
    num_workers: int = 2  # DALI threads or DataLoader workers (0: DataLoader loads in the main process)
    cache: str = "off"  # decoded-image cache: off | auto | host | device (see convnext_fast.data.cache)
    cache_size: int | None = None  # cache images resized to fit cache_size x cache_size; None = stored size
    extra: tuple[tuple[str, object], ...] = ()  # backend-specific options (backend_kwargs), sorted
    schedule: ResolutionSchedule | None = None  # train: the size per epoch (progressive); None = img_size always
    skip_bad: bool = False  # a file that fails at run time is left out (see data/badfiles.py), not an error
    bad_files_log: str | None = None  # where such files are listed (and read back from on resume)

    def option(self, name: str, default=None):
        return dict(self.extra).get(name, default)

    def size_at(self, epoch: int) -> int:
        """The output size of epoch ``epoch``: the schedule's when there is one, else ``img_size``."""
        return self.img_size if self.schedule is None else self.schedule.size(epoch)


# name -> "module:function"; imported only when chosen, so DALI is never imported unless used.
BACKENDS = {
    "dali": "convnext_fast.data.dali:build",
    "torchvision": "convnext_fast.data.baseline:build",
    "synthetic": "convnext_fast.data.synthetic:build",
}


def resolve_device(device: str | torch.device | None) -> torch.device:
    """None -> the current CUDA device if there is one, else CPU. 'cuda' gets an explicit index."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {device}: CUDA is not available on this machine (use --device cpu)")
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
        elif dev.index >= torch.cuda.device_count():
            raise ValueError(f"--device {device}: this machine has {torch.cuda.device_count()} GPU(s)")
    elif dev.type != "cpu":
        raise ValueError(f"--device {device}: expected 'cuda', 'cuda:N' or 'cpu'")
    return dev


def default_num_workers() -> int:
    """CPU cores for this process: the machine's cores shared among the ranks on this node, at most 8."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return max(1, min(8, cores // max(1, local_world)))


def _check_options(train: bool, img_size: int, batch_size: int, scale, ratio, hflip, randaugment, reprob,
                   crop_pct, cache, cache_size) -> None:
    if img_size < 8:
        raise ValueError(f"--img-size must be >= 8, got {img_size}")
    if batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {batch_size}")
    if not (0 < scale[0] <= scale[1] <= 1):
        raise ValueError(f"random-resized-crop scale must satisfy 0 < min <= max <= 1, got {scale}")
    if not (0 < ratio[0] <= ratio[1]):
        raise ValueError(f"random-resized-crop ratio must satisfy 0 < min <= max, got {ratio}")
    for name, p in (("hflip", hflip), ("--reprob", reprob)):
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"{name} probability must be in [0, 1], got {p}")
    if randaugment is not None:
        n, m = randaugment
        if not (n >= 0 and 0 <= m <= 30):
            raise ValueError(f"--randaugment N,M needs N >= 0 and 0 <= M <= 30, got {n},{m}")
    if not 0 < crop_pct <= 1.0:
        raise ValueError(f"crop_pct must be in (0, 1], got {crop_pct}")
    if cache not in ("off", "auto", "host", "device"):
        raise ValueError(f"--cache must be one of off, auto, host, device; got {cache!r}")
    if cache_size is not None and cache_size < 8:
        raise ValueError(f"--cache-size must be >= 8 pixels, got {cache_size}")


def build_loader(root: str | os.PathLike | ImageIndex | None, *, train: bool, img_size: int, batch_size: int,
                 backend: str = "dali", device: str | torch.device | None = None, seed: int = 0,
                 shard_id: int = 0, num_shards: int = 1, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3),
                 hflip: float = 0.5, randaugment: tuple[int, int] | None = (2, 9), reprob: float = 0.0,
                 mean=IMAGENET_MEAN, std=IMAGENET_STD, crop_pct: float = 0.875,
                 dtype: torch.dtype = torch.float32, num_workers: int | None = None, skip_bad: bool = False,
                 verify_images: bool = False, cache: str = "off", cache_size: int | None = None,
                 schedule: ResolutionSchedule | None = None, bad_files_log: str | os.PathLike | None = None,
                 **backend_kwargs) -> Loader:
    """A loader over `root` (a class-folder directory or an `ImageIndex`) for one shard.

    train=True: random-resized-crop, resize to `img_size`, flip, RandAugment, optional random erasing,
    normalize; drops the last partial batch; reshuffles each epoch from (seed, epoch).
    train=False: resize to img_size / crop_pct, center-crop, normalize; every sample once across shards.
    `root=None` is allowed for backend "synthetic" only (pass num_classes=, num_samples=).
    cache (dali backend): "off"; "device" | "host": decode every image once into one uint8 tensor on the device or
    in pinned host memory, later epochs only augment; "auto": device, else host, else off by free memory.
    cache_size=N caches images resized to fit NxN (aspect kept); None = stored size. Other backends ignore both.
    schedule (train only): a `ResolutionSchedule`; each epoch's batches have its `size(epoch)` (read in
    `set_epoch`); `img_size` must be its final size. None = `img_size` every epoch.
    skip_bad: the preflight leaves bad files out, and a file that fails later is replaced by a deterministic
    substitute and appended to `bad_files_log` (read back at construction: a resumed run skips the same files).
    """
    if backend not in BACKENDS:
        raise ValueError(f"--loader {backend!r}: expected one of {', '.join(BACKENDS)}")
    _check_options(train, img_size, batch_size, tuple(scale), tuple(ratio), hflip, randaugment, reprob, crop_pct,
                   cache, cache_size)
    if schedule is not None:
        if not train:
            raise ValueError("a resolution schedule is for training loaders (evaluate at one size)")
        if schedule.img_size != img_size:
            raise ValueError(f"img_size {img_size} differs from the schedule's final size {schedule.img_size}")
    if root is None:
        if backend != "synthetic":
            raise ValueError(f"backend {backend!r} needs an image folder")
        index = None
    elif isinstance(root, ImageIndex):
        index = root
    else:
        index = scan_folder(Path(root), skip_bad=skip_bad, verify_images=verify_images)
    cfg = LoaderConfig(
        train=train, img_size=int(img_size), batch_size=int(batch_size), device=resolve_device(device),
        seed=int(seed), shard_id=int(shard_id), num_shards=int(num_shards), scale=tuple(map(float, scale)),
        ratio=tuple(map(float, ratio)), hflip=float(hflip),
        randaugment=None if randaugment is None else (int(randaugment[0]), int(randaugment[1])),
        reprob=float(reprob), mean=tuple(map(float, mean)), std=tuple(map(float, std)), crop_pct=float(crop_pct),
        dtype=dtype, num_workers=default_num_workers() if num_workers is None else int(num_workers), cache=cache,
        cache_size=None if cache_size is None else int(cache_size), extra=tuple(sorted(backend_kwargs.items())),
        schedule=schedule,
        skip_bad=bool(skip_bad), bad_files_log=None if bad_files_log is None else str(bad_files_log),
    )
    module_name, fn_name = BACKENDS[backend].split(":")
    return getattr(importlib.import_module(module_name), fn_name)(index, cfg)
