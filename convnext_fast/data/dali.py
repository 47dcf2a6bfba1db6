"""The DALI backend: decode + augment on the GPU (`mixed` decoder, `gpu` ops), the same graph on the CPU without one.

The pipeline is built once per loader. The host reads each batch's encoded files and draws every random parameter
in numpy from (seed, epoch, shard, batch) (`dali_params`), then feeds both through `external_source`; so the
batches of an epoch are a pure function of (seed, epoch, shard), resume is `set_epoch(e)`, and a decode failure is
mapped back to the files of the batch that failed. All of that host work, and driving the pipeline itself, runs on
one background thread per epoch (`Prefetcher`), a few batches ahead: the consumer (the training thread) only takes
finished batches from a queue; that thread's GPU work runs on a side stream and each batch is handed to the
consumer's current stream when taken (`streams.StreamHandoff`). An error still surfaces at the batch it belongs
to. DALI is imported only here, lazily, by the registry in `convnext_fast.data`.
"""

from __future__ import annotations

import io
import time
from collections import deque
from typing import Iterator

import numpy as np
import torch

from convnext_fast.data import BackendUnavailable, Batch, ImageIndex, LoaderConfig, epoch_indices
from convnext_fast.data import cache as C
from convnext_fast.data.dali_faults import DaliFaults
from convnext_fast.data.cache import DecodedCache
from convnext_fast.distributed import print0
from convnext_fast.data.dali_augment import train_augment
from convnext_fast.data.dali_params import plan_eval_batch, plan_train_batch
from convnext_fast.data.erase import random_erase
from convnext_fast.data.prefetch import Prefetcher
from convnext_fast.data.streams import StreamHandoff
from convnext_fast.data.transfer import to_device

_RA_INPUTS = ("geom", "pad_h", "pad_w", "warp", "warp_size", "bc", "brightness", "contrast", "color", "saturation",
              "sharp", "kernel", "autocontrast", "equalize", "postsol", "post_mask", "sol_thresh", "sol_inv")
# The A100's hardware JPEG decoder takes this share of a batch; CUDA cores decode the rest in parallel.
HW_DECODER_LOAD = 0.65


def _randaugment_on(cfg: LoaderConfig) -> bool:
    return cfg.train and cfg.randaugment is not None and cfg.randaugment[0] > 0


def input_names(cfg: LoaderConfig, cached: str | None = None) -> tuple[str, ...]:
    """The per-sample host plans the pipeline for `cfg` reads (besides the encoded bytes or cached pixels)."""
    sizes = ("cache_h", "cache_w") if cached == "padded" else ()
    return sizes + ("out_size", "roi_start", "roi_end") + (_RA_INPUTS if _randaugment_on(cfg) else ())


def _graph(cfg: LoaderConfig, dev: str, cached: str | None = None):
    """The pipeline body: encoded bytes (or decoded pixels) + host plans in, normalized HWC images out.

    cached=None: "encoded" is fed and decoded here. cached="padded": "pixels" is fed, a dense [B, Hpad, Wpad, 3]
    batch from the decoded cache (on the pipeline's device), cropped back to each image's "cache_hw";
    cached="uniform": the same without the crop (every cached image fills the padded size).
    """
    from nvidia.dali import fn, types

    # Every input is declared before the first conditional (an input made inside a branch would be split).
    p = {name: fn.external_source(name=name) for name in input_names(cfg, cached)}
    if cached is None:
        jpegs = fn.external_source(name="encoded", dtype=types.UINT8, ndim=1)
        decoder = {"device": "mixed", "hw_decoder_load": HW_DECODER_LOAD} if dev == "gpu" else {"device": "cpu"}
        # adjust_orientation=False: torchvision's pil_loader ignores EXIF orientation too, and the host's crop
        # plans use the stored (W, H).
        img = fn.decoders.image(jpegs, output_type=types.RGB, adjust_orientation=False, **decoder)
    else:
        img = fn.external_source(name="pixels", device=dev, dtype=types.UINT8, ndim=3, layout="HWC")
        if cached == "padded":
            img = fn.crop(img, crop_h=p["cache_h"], crop_w=p["cache_w"], crop_pos_x=0.0, crop_pos_y=0.0)
    if _randaugment_on(cfg):
        if p["geom"]:
            # A 1-px black border, so the warp's cheap clamp-to-edge border reads as torchvision's black fill.
            img = fn.crop(img, crop_h=p["pad_h"], crop_w=p["pad_w"], crop_pos_x=0.5, crop_pos_y=0.5,
                          out_of_bounds_policy="pad", fill_values=0)
            img = fn.warp_affine(img, matrix=p["warp"], size=p["warp_size"], interp_type=types.INTERP_LINEAR)
    # The output size is a per-sample input (the epoch's size from the schedule): one pipeline serves every size.
    img = fn.resize(img, size=p["out_size"], roi_start=p["roi_start"], roi_end=p["roi_end"], roi_relative=False,
                    antialias=True, interp_type=types.INTERP_LINEAR, dtype=types.UINT8)
    if _randaugment_on(cfg):
        img = train_augment(img, p, dev)
    out_type = types.FLOAT16 if cfg.dtype == torch.float16 else types.FLOAT
    return fn.crop_mirror_normalize(img, mean=[255 * m for m in cfg.mean], std=[255 * s for s in cfg.std],
                                    dtype=out_type, output_layout="HWC")


def _torch_out_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float16 if dtype == torch.float16 else torch.float32


class DaliLoader(DaliFaults):
    """The loader protocol (see `convnext_fast.data`) over one DALI pipeline, built once and reused every epoch."""

    def __init__(self, index: ImageIndex, cfg: LoaderConfig):
        self.cfg = cfg
        self.classes = list(index.classes)
        self.class_to_idx = dict(index.class_to_idx)
        self._paths = [p for p, _ in index.samples]
        self._labels = np.asarray(index.targets, np.int64)
        self._sizes = np.full((len(self._paths), 2), -1, np.int64)  # (W, H) read from each file's header once
        self._cache: DecodedCache | None = None  # decoded pixels (cfg.cache), built at the first epoch
        self._cache_decided = cfg.cache == "off"
        self.cache_info: dict | None = None  # what the cache decision was (for logs and benchmark records)
        self._epoch = 0
        self._positions = self._epoch_positions()
        self.num_samples = len(self._positions)
        self._pipe = None
        self._plans: Iterator | None = None
        self._pending: deque = deque()  # (batch, paths, labels) fed to DALI and not yet returned, in order
        self._dirty = False  # an epoch was started and its pipeline state not yet reset
        self._plan_error: BaseException | None = None  # a host read of a batch fed ahead failed: raised at its turn
        self._feeder: Prefetcher | None = None  # the thread running the current epoch
        self._side_stream = None  # the feeder's CUDA stream (data/streams.py), made at the first threaded epoch
        self._init_faults()

    def _epoch_positions(self) -> np.ndarray:
        c = self.cfg
        return epoch_indices(len(self._paths), train=c.train, batch_size=c.batch_size, seed=c.seed,
                             epoch=self._epoch, shard_id=c.shard_id, num_shards=c.num_shards)

    def __len__(self) -> int:
        B = self.cfg.batch_size
        return self.num_samples // B if self.cfg.train else -(-self.num_samples // B)

    @property
    def img_size(self) -> int:
        """This epoch's output size (the schedule's, set by `set_epoch`); the pipeline is the same for all."""
        return self.cfg.size_at(self._epoch)

    def set_epoch(self, epoch: int) -> None:
        if int(epoch) != self._epoch:
            self._epoch = int(epoch)
            self._positions = self._epoch_positions()

    # -- host side: what each batch feeds ------------------------------------------------------------------
    def _read(self, pos: int) -> np.ndarray:
        staged = self._staged.pop(pos, None)  # read already by _fault_hook's check
        if staged is not None:
            return staged
        path = self._paths[pos]
        try:
            return np.fromfile(path, dtype=np.uint8)
        except OSError as e:
            raise self._bad.error(path, e.strerror or str(e)) from e

    def _size(self, pos: int, data: np.ndarray) -> np.ndarray:
        if self._sizes[pos, 0] < 0:
            from PIL import Image

            try:  # header only: PIL reads no pixel data here
                with Image.open(io.BytesIO(data.tobytes())) as im:
                    self._sizes[pos] = im.size
            except Exception as e:  # PIL raises many types for bad files
                raise self._bad.error(self._paths[pos], f"{type(e).__name__}: {e}") from e
        return self._sizes[pos]

    def _batch_plans(self, epoch: int, positions: np.ndarray, size: int) -> Iterator[tuple]:
        """Each batch's feed for `epoch` at output `size` (captured when the epoch's iteration starts)."""
        c, B = self.cfg, self.cfg.batch_size
        cache = self._cache
        for b in range(len(self)):
            pos = positions[b * B:(b + 1) * B]
            if (pos := self._fault_hook(b, pos)) is None:
                continue
            if cache is None:
                encoded = [self._read(int(p)) for p in pos]
                sizes = np.stack([self._size(int(p), d) for p, d in zip(pos, encoded)])
                feed = {"encoded": encoded}
            else:  # no file read, no decode: the pixels are gathered from the cache (on the cache's device)
                sizes = cache.sizes_wh(pos)
                feed = {"pixels": cache.gather(pos, c.device)}
                if not cache.uniform:
                    feed.update(cache_h=sizes[:, 1].astype(np.float32), cache_w=sizes[:, 0].astype(np.float32))
            if c.train:
                rng = np.random.default_rng([c.seed, epoch, c.shard_id, b])
                plan = plan_train_batch(rng, sizes, img_size=size, scale=c.scale, ratio=c.ratio,
                                        hflip=c.hflip, randaugment=c.randaugment)
            else:
                plan = plan_eval_batch(sizes, img_size=size, crop_pct=c.crop_pct)
            feed.update(plan, out_size=np.full((len(pos), 2), size, np.float32))
            yield b, pos, feed

    def _feed(self) -> None:
        """Pipeline.iter_setup: feed the next batch; StopIteration (from `next`) ends the epoch for DALI.

        Runs ahead of the batches returned (DALI's prefetch): a batch whose files cannot be read ends the epoch for
        DALI here, and its error is raised when the batches before it have been returned (`_run_epoch`)."""
        try:
            b, pos, feed = next(self._plans)
        except StopIteration:
            raise
        except Exception as e:
            self._plan_error, self._plans = e, iter(())
            raise StopIteration from None
        for name in input_names(self.cfg, self._cached_kind()) + ("encoded", "pixels"):
            if name not in feed:
                continue
            data = feed[name]
            if isinstance(data, torch.Tensor):
                if data.is_cuda:  # ordered after the gather, queued on this thread's stream (StreamHandoff)
                    stream = torch.cuda.current_stream(data.device).cuda_stream
                    self._pipe.feed_input(name, data, cuda_stream=stream)
                    continue
                data = data.numpy()
            self._pipe.feed_input(name, data)
        self._pending.append((b, [self._paths[int(p)] for p in pos], self._labels[pos]))

    # -- the decoded cache -------------------------------------------------------------------------------------
    def _cached_kind(self) -> str | None:
        if self._cache is None:
            return None
        return "uniform" if self._cache.uniform else "padded"

    def _ensure_cache(self) -> None:
        """First epoch with cfg.cache on: decide where the cache goes, then decode every image it holds once."""
        if self._cache_decided:
            return
        c = self.cfg
        # Train: any rank may need any image (epoch_indices re-deals a global permutation each epoch).
        # Eval: this shard's block is the same every epoch.
        positions = np.arange(len(self._paths)) if c.train else self._positions
        plan = C.plan_cache(self._paths, positions, c.cache_size)
        if len(positions) == 0:  # an empty eval shard
            storage, why = "off", "no images on this shard"
        elif c.cache_size is None and plan.padding > C.MAX_PADDING:
            if c.cache != "auto":
                raise C.padding_error(plan, self._paths)
            storage, why = "off", f"image sizes differ ({plan.padding:.0%} padding; pass --cache-size)"
        else:
            storage, why = C.choose_storage(c.cache, plan.nbytes, c.device)
        print0(f"convnext-fast: {C.describe(c.cache, storage, why, plan, c.train, c.device)}", flush=True)
        self.cache_info = {"mode": c.cache, "storage": storage, "why": why, "images": len(positions),
                           "padded_hw": list(plan.shape[1:3]), "bytes": plan.nbytes if storage != "off" else 0,
                           "padding": round(plan.padding, 4), "bound": c.cache_size, "decode_s": None}
        if storage != "off":
            self._release_pipeline()  # the graph changes: pixels in instead of encoded bytes
            start = time.perf_counter()
            self._cache = C.build_cache(self._paths, plan, storage, c.device, batch_size=c.batch_size,
                                        num_threads=max(1, c.num_workers))
            self.cache_info["decode_s"] = round(time.perf_counter() - start, 3)
        self._cache_decided = True

    # -- device side -----------------------------------------------------------------------------------------
    def _build_pipeline(self):
        from nvidia.dali import pipeline_def

        cfg = self.cfg
        dev = "gpu" if cfg.device.type == "cuda" else "cpu"

        cached = self._cached_kind()

        @pipeline_def(enable_conditionals=True)
        def pipeline():
            return _graph(cfg, dev, cached)

        pipe = pipeline(batch_size=cfg.batch_size, num_threads=max(1, cfg.num_workers),
                        device_id=cfg.device.index if dev == "gpu" else None, seed=cfg.seed,
                        prefetch_queue_depth=int(cfg.option("prefetch", 2)), exec_dynamic=True)
        pipe.build()
        pipe.iter_setup = self._feed
        return pipe

    def _to_batch(self, out, epoch: int, b: int, labels: np.ndarray, stream) -> Batch:
        """The pipeline's output copied into a torch batch on `stream` (the producer's; erasing and the labels'
        copy are queued there too, as it is the producing thread's current stream)."""
        from nvidia.dali.plugin.pytorch import feed_ndarray

        c = self.cfg
        tensor = out.as_tensor()
        images = torch.empty(tuple(tensor.shape()), dtype=_torch_out_dtype(c.dtype), device=c.device)
        feed_ndarray(tensor, images, cuda_stream=stream)
        images = images.permute(0, 3, 1, 2)  # NHWC memory == channels_last [B, 3, S, S]
        if images.dtype != c.dtype:
            images = images.to(c.dtype)
        if c.train and c.reprob > 0:
            images = random_erase(images, c.reprob, np.random.default_rng([c.seed, epoch, c.shard_id, b, 1]))
        return Batch(images, to_device(labels, c.device))

    def _drain(self) -> None:
        """Finish an epoch the consumer left early (or after its last batch), so the next starts clean."""
        pipe = self._pipe
        self._plans = iter(())
        pipe.schedule_run()  # only marks the end of the epoch: there is nothing left to feed
        while not pipe.empty():
            pipe.outputs()
        pipe.reset()
        self._pending.clear()
        self._dirty = False

    def __iter__(self) -> Iterator[Batch]:
        self._stop_feeder()
        self._ensure_cache()
        if self._pipe is None:
            self._pipe = self._build_pipeline()
            self._dirty = False
        elif self._dirty:
            self._drain()
        # One plain thread that also drives the pipeline, not a planning thread or DALI's parallel external_source
        # feeding a pipeline the consumer drives: DALI runs iter_setup (feed_input of ~20 inputs) on the thread that
        # calls schedule_run, and the output copy (+ erasing) stays with outputs(). Measured at batch 256, 32 px,
        # RandAugment, 2 cores, first epoch: 60 ms/batch of host work, 50 in reads + headers + plans, 10 in
        # feed_input / outputs / copy-out (more at 192 px); that 10 would stay on the training thread.
        depth = int(self.cfg.option("feed_ahead", 2))
        handoff = self._stream_handoff(threaded=depth > 0)
        self._feeder = feeder = Prefetcher(self._run_epoch(self._epoch, self._positions, handoff), depth,
                                           name="dali-feed", setup=handoff.feeder_setup)
        try:
            for batch, ready in feeder:
                handoff.receive(batch, ready)  # here: on the consumer's thread, in its next()
                yield batch
        finally:
            if self._feeder is feeder:
                self._stop_feeder()

    def _stream_handoff(self, threaded: bool) -> StreamHandoff:
        """The feeder's side stream is the loader's, made once: a stream per epoch would be a new one each time."""
        if self._side_stream is None and threaded and self.cfg.device.type == "cuda":
            self._side_stream = torch.cuda.Stream(self.cfg.device)
        return StreamHandoff(self.cfg.device, threaded=threaded, side=self._side_stream)

    def _run_epoch(self, epoch: int, positions: np.ndarray, handoff: StreamHandoff) -> Iterator[tuple[Batch, object]]:
        """One epoch's (batch, ready event), in order: feeds the pipeline and collects its outputs (on the feeder
        thread, whose current stream is the handoff's)."""
        pipe = self._pipe
        # Outputs bound to the producer's stream: ready in its order (no host wait) and freed in its order, after
        # the copy out that _to_batch queues there (DALI's default, None, waits on the host for each batch).
        stream = handoff.stream()
        self._iter_epoch = epoch
        self._plans = self._batch_plans(epoch, positions, self.cfg.size_at(epoch))
        self._plan_error = None
        self._dirty = True
        restarts = 0  # pipeline rebuilds after a bad file this epoch (bounded: DaliFaults._after_failure)
        try:
            pipe.schedule_run()  # the first call prefetches prefetch_queue_depth batches
            while True:
                try:
                    (out,) = pipe.outputs(cuda_stream=stream)
                except StopIteration:
                    break
                except (RuntimeError, IndexError, ValueError) as e:  # DALI reports decode failures this way
                    if self._cache is not None:  # nothing is decoded from a cache: not a file's fault
                        raise
                    restarts += 1
                    pipe = self._after_failure(e, restarts)  # raises unless a bad file is skipped
                    continue
                b, _, labels = self._pending.popleft()
                pipe.schedule_run()
                batch = self._to_batch(out, epoch, b, labels, stream)
                yield batch, handoff.ready()
            if self._plan_error is not None:  # the batch after the last one returned could not be read
                raise self._plan_error
            pipe.reset()
            self._dirty = False
        finally:
            if self._dirty and self._pipe is pipe:  # left early, or failed
                try:
                    self._drain()
                except Exception:  # a failed pipeline is not reusable: rebuild it on the next epoch
                    self._release_pipeline()

    def _stop_feeder(self) -> None:
        """Stop the epoch's thread (an early `break`, a new epoch, close): it drains the pipeline and exits."""
        feeder, self._feeder = self._feeder, None
        if feeder is not None and not feeder.close():  # stuck in DALI: leave it (a daemon) and its pipeline
            self._release_pipeline()
            self._dirty = False

    def _release_pipeline(self) -> None:
        self._pipe = None
        self._pending.clear()
        self._plans = None

    def close(self) -> None:
        """Stop the feeder thread, release the pipeline (its threads and buffers) and the decoded cache; iterating
        again rebuilds both."""
        self._stop_feeder()
        self._release_pipeline()
        self._cache = None
        self._cache_decided = self.cfg.cache == "off"


def build(index: ImageIndex, cfg: LoaderConfig) -> DaliLoader:
    """Registry entry for backend="dali"."""
    if index is None:
        raise ValueError("backend 'dali' needs an image folder")
    try:
        import nvidia.dali  # noqa: F401
    except ImportError as e:
        raise BackendUnavailable("dali", f"NVIDIA DALI: {type(e).__name__}: {e}",
                                 "pip install nvidia-dali-cuda130, or use --loader torchvision") from e
    return DaliLoader(index, cfg)
