"""torchrun / DDP plumbing: read the launcher's environment, set up the process group, rank-0 helpers.

Under `torchrun` (RANK, WORLD_SIZE, LOCAL_RANK set) this joins the process group (NCCL on CUDA, gloo on CPU) and
pins the process to GPU LOCAL_RANK; without it everything is a no-op and world_size is 1.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Mapping

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


_INFO = DistInfo()


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None:
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def init_distributed(device: str | None = None, timeout_s: float = 1800.0) -> DistInfo:
    """Join the torchrun process group if there is one; return this process's rank and device.

    `device`: "cuda", "cuda:N", "cpu" or None (CUDA when available). Under torchrun with CUDA, the device is
    cuda:LOCAL_RANK; "cuda:N" is then refused unless N == LOCAL_RANK. In a single process "cuda:N" is used as given.
    """
    global _INFO
    rank, world_size = _env_int("RANK", 0), _env_int("WORLD_SIZE", 1)
    local_rank = _env_int("LOCAL_RANK", 0)
    dev = _process_device(device, local_rank, launched="LOCAL_RANK" in os.environ)
    kind = dev.type
    if kind == "cuda":
        torch.cuda.set_device(dev)
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if kind == "cuda" else "gloo"
        kwargs = {"device_id": dev} if kind == "cuda" else {}
        dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s), **kwargs)
    _INFO = DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=dev)
    return _INFO


def _process_device(device: str | None, local_rank: int, launched: bool) -> torch.device:
    """This process's device: `device` (None: CUDA when available), a CUDA index from torchrun's LOCAL_RANK when
    launched by it, else the index given (default 0). A one-line ValueError for what cannot work."""
    try:
        want = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except (RuntimeError, ValueError):
        raise ValueError(f"--device {device}: expected 'cuda', 'cuda:N' or 'cpu'") from None
    if want.type == "cpu":
        return torch.device("cpu")
    if want.type != "cuda":
        raise ValueError(f"--device {device}: expected 'cuda', 'cuda:N' or 'cpu'")
    if not torch.cuda.is_available():
        raise ValueError(f"--device {device}: CUDA is not available on this machine (use --device cpu)")
    count = torch.cuda.device_count()
    if launched:
        if want.index is not None and want.index != local_rank:
            raise ValueError(f"--device {device} conflicts with torchrun's LOCAL_RANK={local_rank} (each process uses "
                             f"cuda:LOCAL_RANK): pass --device cuda, and choose GPUs with CUDA_VISIBLE_DEVICES")
        if local_rank >= count:
            raise ValueError(f"LOCAL_RANK={local_rank} but this node has {count} GPU(s)")
        return torch.device("cuda", local_rank)
    index = 0 if want.index is None else want.index
    if index >= count:
        raise ValueError(f"--device {device}: this machine has {count} GPU(s) (cuda:0..cuda:{count - 1})")
    return torch.device("cuda", index)


def get_info() -> DistInfo:
    return _INFO


def destroy_distributed() -> None:
    global _INFO
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    _INFO = DistInfo(device=_INFO.device)


def is_main() -> bool:
    return _INFO.is_main


def print0(*args, **kwargs) -> None:
    """print() on rank 0 only: one place prints."""
    if _INFO.is_main:
        print(*args, **kwargs)


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum `t` over ranks in place (a no-op in a single process). Returns `t`."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def barrier() -> None:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def all_gather_object(obj: Any) -> list:
    """`[obj of rank 0, obj of rank 1, ...]` (collective under DDP; `[obj]` in a single process)."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return [obj]
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def state_digest(state: Mapping[str, torch.Tensor]) -> str:
    """A hex digest of a state dict's names, dtypes, shapes and exact bits (independent of memory layout).

    Copies the tensors to the host: meant for once-per-run checks, not for the training step.
    """
    h = hashlib.blake2b(digest_size=16)
    for name in sorted(state):
        t = state[name].detach()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.contiguous().reshape(-1).view(torch.uint8).cpu().numpy().tobytes())
    return h.hexdigest()


def replica_digests(state: Mapping[str, torch.Tensor]) -> list[str]:
    """Every rank's `state_digest` of its replica, indexed by rank (collective under DDP).

    DDP keeps replicas equal only as long as every rank applies the same update; a rank that skipped a step,
    loaded other weights or updated a buffer on its own drifts silently. Equal digests prove it did not.
    """
    return all_gather_object(state_digest(state))
