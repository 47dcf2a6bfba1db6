"""Decode once: the decoded pixels of a dataset kept in one uint8 tensor, on the device or in host memory.

`cache="device" | "host" | "auto" | "off"` (CLI `--cache`, `--cache-size N`) of the DALI loader. At its first
epoch the loader decodes every image it can ever need once (`build_cache`: a decode-only DALI pipeline, `mixed`
on CUDA, `cpu` otherwise); later batches are gathered from the cache and fed to the same augmentation graph through
`external_source`, so no file is read and no JPEG decoded again. The random plans still come from (seed, epoch,
shard, batch) and from the cached image sizes, so a cached epoch is the same pure function of (seed, epoch,
shard) as an uncached one, and equals it pixel for pixel when the images are cached at their stored size.

Semantics (stated once, here):
  - What is cached: train loaders cache the WHOLE index on every rank, because `epoch_indices` deals a new global
    permutation to the ranks each epoch, so any rank may need any image (the shard guarantees stay untouched;
    the cost is world_size copies on a node for a host cache, which `auto`'s host budget accounts for). Eval
    loaders cache only their own contiguous block, which never changes.
  - Size: without a bound (`cache_size=None`) images are stored as decoded and padded to the largest height and
    largest width among them (per-image heights/widths are kept; the padding is never read). A cache that would
    be more than half padding (sizes differ a lot) is refused with a DatasetError naming the images that set the
    padded size (`auto` falls back to off instead). With a bound, an image whose longer side exceeds it is
    downscaled (bilinear, antialiased, aspect kept) so that it fits: the cache then holds a smaller dataset, and
    batches equal the uncached loader's on images pre-resized the same way, not on the originals.
  - Where: `device` = the loader's device (host memory for a CPU loader); `host` = host memory. Each batch is
    gathered from a host cache into a pinned staging buffer and copied to the GPU asynchronously; the cache itself
    is not pinned, because the gather copies anyway, and pinning gigabytes through torch's caching host allocator
    would round the request up to a power of two and keep it after `close()`. `auto` takes the device when the cache
    needs at most AUTO_DEVICE_FRACTION of free device memory, else the host when it needs at most
    AUTO_HOST_FRACTION of available RAM divided by the ranks on this node, else off; it prints one line (rank 0)
    with its choice and the memory taken. An explicit `device`/`host` that needs more than EXPLICIT_FRACTION of
    the free memory raises a ValueError with the numbers.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch

from convnext_fast.data.index import DatasetError, format_paths
from convnext_fast.data.transfer import to_device

AUTO_DEVICE_FRACTION = 0.5  # model, optimizer, activations and DALI's own buffers need the rest
AUTO_HOST_FRACTION = 0.5
EXPLICIT_FRACTION = 0.9
MAX_PADDING = 0.5  # without a bound, a cache more than half padding is refused (pass --cache-size)
GiB = 1 << 30


def _size(nbytes: int) -> str:
    return f"{nbytes / GiB:.2f} GiB" if nbytes >= GiB // 4 else f"{nbytes / (1 << 20):.1f} MiB"


def read_sizes(paths: list[str]) -> np.ndarray:
    """(W, H) of each file from its header (no pixel data read). A bad header raises DatasetError naming it."""
    from PIL import Image

    out = np.zeros((len(paths), 2), np.int64)
    for i, path in enumerate(paths):
        try:
            with Image.open(path) as im:
                out[i] = im.size
        except Exception as e:  # PIL raises many types for bad files
            raise DatasetError(f"cannot read image {path}: {type(e).__name__}: {e}") from e
    return out


def fit_dims(sizes_wh: np.ndarray, bound: int | None) -> np.ndarray:
    """Cached (H, W) of images of `sizes_wh` ((W, H) each): unchanged, or longer side scaled down to `bound`."""
    W, H = sizes_wh[:, 0].astype(np.float64), sizes_wh[:, 1].astype(np.float64)
    if bound is None:
        return np.stack([H, W], 1).astype(np.int64)
    s = np.minimum(1.0, bound / np.maximum(W, H))
    return np.stack([np.maximum(1, np.round(H * s)), np.maximum(1, np.round(W * s))], 1).astype(np.int64)


@dataclass(frozen=True)
class CachePlan:
    """What a cache of `positions` will hold: per-image (H, W) and the padded tensor's shape. No memory taken."""

    positions: np.ndarray  # int64, positions into index.samples; cache row r holds positions[r]
    stored_wh: np.ndarray  # int64 [N, 2] (W, H) as stored in the files
    dims: np.ndarray  # int64 [N, 2] (H, W) as cached
    bound: int | None

    @property
    def shape(self) -> tuple[int, int, int, int]:
        h, w = (int(v) for v in self.dims.max(0)) if len(self.dims) else (1, 1)
        return len(self.dims), h, w, 3

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape))

    @property
    def padding(self) -> float:
        """Share of the cache that is padding."""
        used = int((self.dims[:, 0] * self.dims[:, 1]).sum()) * 3
        return 1.0 - used / self.nbytes if len(self.dims) else 0.0

    def resized(self) -> np.ndarray:
        return (self.dims[:, 0] != self.stored_wh[:, 1]) | (self.dims[:, 1] != self.stored_wh[:, 0])


def plan_cache(paths: list[str], positions: np.ndarray, bound: int | None,
               sizes_wh: np.ndarray | None = None) -> CachePlan:
    positions = np.asarray(positions, np.int64)
    if sizes_wh is None:
        sizes_wh = read_sizes([paths[int(p)] for p in positions])
    return CachePlan(positions, sizes_wh, fit_dims(sizes_wh, bound), bound)


def padding_error(plan: CachePlan, paths: list[str]) -> DatasetError:
    """Name the images that set the padded height/width, against the typical size."""
    _, ph, pw, _ = plan.shape
    big = np.flatnonzero((plan.dims[:, 0] == ph) | (plan.dims[:, 1] == pw))
    med_h, med_w = (int(v) for v in np.median(plan.dims, 0))
    named = [f"{paths[int(plan.positions[i])]} ({plan.dims[i, 1]}x{plan.dims[i, 0]})" for i in big]
    return DatasetError(
        f"--cache without --cache-size: image sizes differ too much to cache them padded to the largest "
        f"({pw}x{ph}; {plan.padding:.0%} of the cache would be padding; typical image {med_w}x{med_h}). "
        f"Pass --cache-size N to cache every image resized to fit NxN, or --cache off. Largest images:\n"
        + format_paths(named))


def free_device_memory(device: torch.device) -> int:
    """Free bytes on a CUDA device (torch.cuda.mem_get_info)."""
    return int(torch.cuda.mem_get_info(device)[0])


def available_host_memory() -> int:
    """MemAvailable from /proc/meminfo (Linux), else total physical memory."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _local_ranks() -> int:
    return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def choose_storage(mode: str, nbytes: int, device: torch.device) -> tuple[str, str]:
    """('device' | 'host' | 'off', why) for a cache of `nbytes` on a loader for `device`.

    A CPU loader's device is the host: `device` and `host` are the same memory there and `auto` says `host`.
    Explicit modes raise ValueError when the cache needs more than EXPLICIT_FRACTION of the free memory.
    """
    host_free = available_host_memory() // _local_ranks()
    dev_free = free_device_memory(device) if device.type == "cuda" else host_free
    need = _size(nbytes)
    if mode == "auto":
        if device.type == "cuda" and nbytes <= AUTO_DEVICE_FRACTION * dev_free:
            return "device", f"{need} fits in {AUTO_DEVICE_FRACTION:.0%} of {dev_free / GiB:.1f} GiB free on {device}"
        if nbytes <= AUTO_HOST_FRACTION * host_free:
            return "host", (f"{need} fits in {AUTO_HOST_FRACTION:.0%} of {host_free / GiB:.1f} GiB available host "
                            f"memory per rank" + (" (not in device memory)" if device.type == "cuda" else ""))
        return "off", f"{need} fits in neither device nor host memory budget"
    free, where = (dev_free, str(device)) if mode == "device" and device.type == "cuda" else (host_free, "host")
    if nbytes > EXPLICIT_FRACTION * free:
        raise ValueError(f"--cache {mode}: the decoded images need {need} but only {free / GiB:.2f} GiB is free on "
                         f"{where} (per rank); pass --cache-size N to cache smaller images, or --cache auto|off")
    return mode, f"{need} of {free / GiB:.1f} GiB free on {where}"


class DecodedCache:
    """Decoded uint8 images [N, Hpad, Wpad, 3] with their (H, W), addressed by index position."""

    def __init__(self, plan: CachePlan, pixels: torch.Tensor, num_positions: int):
        self.plan = plan
        self.pixels = pixels
        self.dims = plan.dims
        self.uniform = bool((plan.dims == plan.dims[:1]).all()) and plan.padding == 0.0
        self._row = np.full(num_positions, -1, np.int64)
        self._row[plan.positions] = np.arange(len(plan.positions))

    @property
    def nbytes(self) -> int:
        return self.pixels.numel()

    def rows(self, positions: np.ndarray) -> np.ndarray:
        rows = self._row[positions]
        assert (rows >= 0).all(), "a position outside the cached subset"
        return rows

    def sizes_wh(self, positions: np.ndarray) -> np.ndarray:
        """(W, H) of the cached images: what the batch planners see."""
        return self.dims[self.rows(positions)][:, ::-1].copy()

    def gather(self, positions: np.ndarray, device: torch.device) -> torch.Tensor:
        """The padded images of `positions` as one [B, Hpad, Wpad, 3] tensor on `device`."""
        rows = self.rows(positions)
        if self.pixels.is_cuda:
            return self.pixels.index_select(0, to_device(rows, self.pixels.device))
        # numpy, not torch, on the host: torch's intra-op (OpenMP) threads spin after each op and took CPU from
        # DALI's threads (measured: 2x slower epochs on 2 cores)
        if device.type == "cuda":  # a pinned staging buffer: torch's host allocator keeps it until the copy is done
            buf = torch.empty((len(rows),) + tuple(self.pixels.shape[1:]), dtype=torch.uint8, pin_memory=True)
            np.take(self.pixels.numpy(), rows, axis=0, out=buf.numpy())
            return buf.to(device, non_blocking=True)
        return torch.from_numpy(self.pixels.numpy()[rows])


def _alloc(shape, storage: str, device: torch.device) -> torch.Tensor:
    on_device = storage == "device" and device.type == "cuda"
    return torch.empty(shape, dtype=torch.uint8, device=device if on_device else "cpu")


def _decode_pipeline(shape_hw: tuple[int, int], batch_size: int, num_threads: int, device: torch.device):
    """Encoded bytes -> RGB, downscaled where the plan says, padded to the cache's (H, W): a dense batch."""
    from nvidia.dali import fn, pipeline_def, types

    gpu = device.type == "cuda"

    @pipeline_def(enable_conditionals=True)
    def pipe():
        size = fn.external_source(name="size")
        resize = fn.external_source(name="resize")
        encoded = fn.external_source(name="encoded", dtype=types.UINT8, ndim=1)
        decoder = {"device": "mixed"} if gpu else {"device": "cpu"}
        # Same decoder settings as the uncached graph (dali._graph), so a cache at stored size is bit-identical.
        img = fn.decoders.image(encoded, output_type=types.RGB, adjust_orientation=False, **decoder)
        if resize:
            img = fn.resize(img, size=size, antialias=True, interp_type=types.INTERP_LINEAR, dtype=types.UINT8)
        shapes = img.shape()
        return fn.pad(img, axis_names="HW", shape=list(shape_hw), fill_value=0), shapes

    p = pipe(batch_size=batch_size, num_threads=num_threads, device_id=device.index if gpu else None,
             prefetch_queue_depth=1, exec_dynamic=True)
    p.build()
    return p


def build_cache(paths: list[str], plan: CachePlan, storage: str, device: torch.device, *, batch_size: int,
                num_threads: int) -> DecodedCache:
    """The decode pass: every image of `plan` decoded once into a new tensor (`storage` on/for `device`).
    A file that does not decode raises DatasetError naming it."""
    from nvidia.dali.plugin.pytorch import feed_ndarray

    from convnext_fast.data.index import decode_check

    n, ph, pw, _ = plan.shape
    pixels = _alloc(plan.shape, storage, device)
    pipe = _decode_pipeline((ph, pw), batch_size, num_threads, device)
    resized = plan.resized()
    stream = torch.cuda.current_stream(device) if device.type == "cuda" else None
    for start in range(0, n, batch_size):
        rows = np.arange(start, min(n, start + batch_size))
        batch_paths = [paths[int(plan.positions[r])] for r in rows]
        pipe.feed_input("encoded", [_read_bytes(p) for p in batch_paths])
        pipe.feed_input("size", plan.dims[rows].astype(np.float32))
        pipe.feed_input("resize", resized[rows])
        try:
            images, shapes = pipe.run()
        except (RuntimeError, IndexError, ValueError) as e:  # DALI reports decode failures this way
            bad = next(((p, why) for p in batch_paths if (why := decode_check(p)) is not None), None)
            if bad is not None:
                raise DatasetError(f"cannot decode image {bad[0]}: {bad[1]}") from None
            raise DatasetError(f"DALI failed to decode one of these images ({type(e).__name__}):\n"
                               + format_paths(batch_paths)) from e
        shapes = shapes.as_cpu() if hasattr(shapes, "as_cpu") else shapes
        got = np.array([shapes.at(i)[:2] for i in range(len(rows))], np.int64)
        wrong = np.flatnonzero((got != plan.dims[rows]).any(1))
        if len(wrong):  # the crop plans use the header's size: a file whose pixels disagree would be mis-cropped
            i = int(wrong[0])
            raise DatasetError(f"image {batch_paths[i]} decoded as {got[i, 1]}x{got[i, 0]} but its header says "
                               f"{plan.stored_wh[rows[i], 0]}x{plan.stored_wh[rows[i], 1]}")
        dst = pixels[start:start + len(rows)]
        tensor = images.as_tensor()
        if device.type == "cuda" and not dst.is_cuda:  # decoded on the GPU, stored on the host
            tmp = torch.empty_like(dst, device=device)
            feed_ndarray(tensor, tmp, cuda_stream=stream)
            dst.copy_(tmp)
        else:
            feed_ndarray(tensor, dst, cuda_stream=stream)
    if stream is not None:
        stream.synchronize()
    del pipe
    return DecodedCache(plan, pixels, len(paths))


def _read_bytes(path: str) -> np.ndarray:
    try:
        return np.fromfile(path, dtype=np.uint8)
    except OSError as e:
        raise DatasetError(f"cannot read image {path}: {e.strerror or e}") from e


def describe(mode: str, storage: str, why: str, plan: CachePlan, train: bool, device: torch.device) -> str:
    """The one log line of a cache decision."""
    if storage == "off":
        return f"cache {mode} -> off: {why}"
    n, h, w, _ = plan.shape
    where = storage if device.type == "cuda" or storage == "host" else "device (= host memory on a CPU loader)"
    what = "train: every image, as shards change each epoch" if train else "eval: this shard"
    fit = f"fit in {plan.bound}x{plan.bound}, " if plan.bound else ""
    return (f"cache {mode} -> {where}: {n} images ({what}) decoded once, {_size(plan.nbytes)} padded to {w}x{h} "
            f"({fit}{plan.padding:.0%} padding); {why}")
