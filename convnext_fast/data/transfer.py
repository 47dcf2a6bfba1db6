"""Host arrays to the device without blocking the host or waiting for the device's queued work."""

from __future__ import annotations

import numpy as np
import torch


def to_device(a: np.ndarray, device: torch.device) -> torch.Tensor:
    """`a` as a tensor on `device`: on CUDA one copy from pinned memory, queued on the current stream.

    A non-blocking copy from pageable memory is not asynchronous: CUDA waits for the stream's queued work (the
    previous training step) before staging it. Pinned, the host moves on at once; torch's host allocator keeps the
    pinned block until the copy has run. On the CPU: the array's memory, no copy.
    """
    t = torch.from_numpy(np.ascontiguousarray(a))
    if device.type != "cuda":
        return t
    return t.pin_memory().to(device, non_blocking=True)
