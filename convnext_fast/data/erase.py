"""Random erasing of a whole batch on its device, with no host-device synchronization."""

from __future__ import annotations

import numpy as np
import torch

from convnext_fast.data.transfer import to_device


def random_erase(images: torch.Tensor, prob: float, rng: np.random.Generator) -> torch.Tensor:
    """timm's RandomErasing (mode 'pixel', one box) for a whole batch: per-sample boxes drawn on the host,
    filled with standard-normal noise (the normalized space) from a generator seeded by the same draw.
    The boxes cross to the device in ONE non-blocking copy from pinned memory. Modifies `images` in place and
    returns it."""
    n, _, H, W = images.shape
    erase = rng.random(n) < prob
    area = H * W * rng.uniform(0.02, 1 / 3, (n, 10))
    aspect = np.exp(rng.uniform(np.log(0.3), np.log(1 / 0.3), (n, 10)))
    h = np.round(np.sqrt(area * aspect)).astype(np.int64)
    w = np.round(np.sqrt(area / aspect)).astype(np.int64)
    ok = (h < H) & (w < W)
    first = np.argmax(ok, axis=1)
    rows = np.arange(n)
    h, w = h[rows, first], w[rows, first]
    erase &= ok.any(axis=1)
    if not erase.any():
        return images
    top = np.floor(rng.random(n) * (H - h + 1)).astype(np.int64)
    left = np.floor(rng.random(n) * (W - w + 1)).astype(np.int64)
    dev = images.device
    # One [5, k] int64 block: which samples, and their boxes' top, bottom, left, right.
    box = to_device(np.stack([np.flatnonzero(erase), top[erase], (top + h)[erase], left[erase], (left + w)[erase]]),
                     dev)
    idx = box[0]
    y0, y1, x0, x1 = (box[i].view(-1, 1, 1) for i in range(1, 5))
    ys = torch.arange(H, device=dev).view(1, H, 1)
    xs = torch.arange(W, device=dev).view(1, 1, W)
    mask = (ys >= y0) & (ys < y1) & (xs >= x0) & (xs < x1)  # [k, H, W]
    gen = torch.Generator(device=dev).manual_seed(int(rng.integers(2 ** 62)))
    noise = torch.randn((len(mask), 3, H, W), generator=gen, device=dev, dtype=images.dtype)
    sel = images.index_select(0, idx)
    # In place: the caller's batch tensor is freshly made for this batch (no full-batch copy per step).
    images.index_copy_(0, idx, torch.where(mask.unsqueeze(1), noise, sel))
    return images
