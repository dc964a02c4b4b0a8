"""One cell trained by N processes (DDP), driven by the torch.distributed environment.

RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT are what torchrun, `bench run
--gpus-per-cell N` and a Slurm task export. Without a process group every helper here is the
identity or a no-op, so a single-process cell runs exactly the code it ran before DDP existed.

Gradients are averaged explicitly after backward (`all_reduce_gradients`) instead of wrapping the
student in DistributedDataParallel: adapters call `student.train_forward`, `detect` and the heads'
methods, never `forward`, which is the only call DDP hooks (and unused parameters, such as LSM's
F_aux before its first pseudo-box, would stall its reducer).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from datetime import timedelta
from typing import TypeVar

import torch
import torch.distributed as dist

from core.errors import BenchError

T = TypeVar("T")

# Rank 0 evaluates alone while the other ranks wait at a barrier; COCO val2017 on one GPU takes
# minutes, so the default 10 minutes of NCCL would be too short. A crashed rank does not make the
# others wait this long: the launcher (local executor, torchrun, srun) stops its siblings.
TIMEOUT = timedelta(minutes=int(os.environ.get("BENCH_DDP_TIMEOUT_MIN", "60")))


def env_world_size() -> int:
    """WORLD_SIZE from the environment (1 when unset): how many processes train this cell."""
    raw = os.environ.get("WORLD_SIZE", "1") or "1"
    try:
        n = int(raw)
    except ValueError:
        raise BenchError(f"WORLD_SIZE={raw!r} is not an integer; unset it or set the number of processes") from None
    if n < 1:
        raise BenchError(f"WORLD_SIZE={n} must be >= 1; unset it or set the number of processes")
    return n


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def is_main() -> bool:
    """Rank 0 (or a single process): the one that writes files, logs to MLflow and evaluates."""
    return rank() == 0


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0")) if is_distributed() else 0


def init_process_group(device: torch.device) -> torch.device:
    """Join the group described by the environment; returns this rank's device (cuda:LOCAL_RANK).

    NCCL for CUDA devices, gloo on CPU."""
    missing = [v for v in ("RANK", "MASTER_ADDR", "MASTER_PORT") if not os.environ.get(v)]
    if missing:
        raise BenchError(f"WORLD_SIZE={os.environ.get('WORLD_SIZE')} but {', '.join(missing)} unset; "
                         "launch with torchrun or `bench run --gpus-per-cell N`, or unset WORLD_SIZE")
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=TIMEOUT,
                            **({"device_id": device} if device.type == "cuda" else {}))
    return device


def teardown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def rank_device(device: torch.device) -> torch.device:
    """The device this rank trains on: cuda:LOCAL_RANK under DDP on GPUs, `device` otherwise."""
    if is_distributed() and device.type == "cuda":
        return torch.device("cuda", local_rank())
    return device


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def broadcast_object(obj: T, src: int = 0) -> T:
    """Rank `src`'s `obj` on every rank (a decision made once, e.g. "is this cell done?")."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj) -> list:
    if not is_distributed():
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def main_first(fn: Callable[[], T]) -> T:
    """Rank 0 runs `fn` alone (it may write files), then the others run it (they read them).

    What rank 0 raised is raised on every rank, so nobody waits at a barrier for a rank that failed.
    """
    if not is_distributed():
        return fn()
    error, out = None, None
    if is_main():
        try:
            out = fn()
        except BaseException as exc:  # noqa: BLE001  (re-raised below, after telling the others)
            error = exc
    message = broadcast_object(None if error is None else f"{type(error).__name__}: {error}")
    if error is not None:
        raise error
    if message is not None:
        raise BenchError(f"rank 0 failed: {message}")
    return out if is_main() else fn()


def check_same(value, what: str) -> None:
    """Every rank must hold the same `value` (e.g. the split manifest's sha256)."""
    values = all_gather_object(value)
    if any(v != values[0] for v in values):
        raise BenchError(f"the {world_size()} processes of this cell disagree on {what}: {values}; "
                         "they must share one BENCH_HOME (a shared filesystem)")


def per_rank_batch(global_batch: int, name: str) -> int:
    """Batch sizes in the config are global: each of the N processes takes global / N images."""
    n = world_size() if is_distributed() else env_world_size()
    if global_batch % n:
        raise BenchError(f"{name}={global_batch} is the global batch and must be divisible by the {n} "
                         f"processes of the cell; set it to a multiple of {n} or change --gpus-per-cell")
    return global_batch // n


@torch.no_grad()
def all_reduce_gradients(params) -> None:
    """Average the gradients of `params` over the ranks (in place): the update of N processes
    with global/N images each equals the 1-process update with the global batch wherever the
    losses are means over equally many terms per image (docs/runner.md, "Multi-GPU cells").

    A parameter without a gradient on every rank keeps none, as it would in the 1-process run
    (SGD then skips its weight decay and momentum); one with a gradient on some rank gets the
    average with zeros for the others."""
    if not is_distributed():
        return
    params = [p for p in params if p.requires_grad]
    if not params:
        return
    device = params[0].device
    has = torch.tensor([p.grad is not None for p in params], dtype=torch.int32, device=device)
    dist.all_reduce(has, op=dist.ReduceOp.MAX)
    by_dtype: dict[torch.dtype, list[torch.nn.Parameter]] = {}
    for p, h in zip(params, has.tolist()):
        if h:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            by_dtype.setdefault(p.grad.dtype, []).append(p)
    n = world_size()
    for group in by_dtype.values():  # one flat buffer per dtype: one collective, not one per tensor
        flat = torch.cat([p.grad.reshape(-1) for p in group])
        dist.all_reduce(flat)
        flat.div_(n)
        offset = 0
        for p in group:
            k = p.grad.numel()
            p.grad.copy_(flat[offset:offset + k].view_as(p.grad))
            offset += k


@torch.no_grad()
def average_buffers(module: torch.nn.Module) -> None:
    """Average the floating-point buffers (BatchNorm running statistics) over the ranks, in place.

    Train-mode BatchNorm (the tiny CPU trunk; R50 and MobileNetV2 use frozen BN) normalises with
    each rank's own half batch and updates its running statistics from it: averaging keeps the
    ranks' models identical (DDP broadcasts rank 0's instead) and gives the global batch's running
    mean exactly, its running variance approximately. Identical buffers stay bit-identical."""
    if not is_distributed():
        return
    buffers = [b for b in module.buffers() if b.is_floating_point()]
    if not buffers:
        return
    flat = torch.cat([b.reshape(-1) for b in buffers])
    dist.all_reduce(flat)
    flat.div_(world_size())
    offset = 0
    for b in buffers:
        b.copy_(flat[offset:offset + b.numel()].view_as(b))
        offset += b.numel()


def mean_scalars(values: dict[str, float]) -> dict[str, float]:
    """Per-key mean over the ranks that have the key (loss terms: the global batch's loss where
    every rank's loss is a per-image mean; ratios such as pseudo-label precision: approximate)."""
    if not is_distributed():
        return values
    import numbers

    gathered = all_gather_object({k: float(v) for k, v in values.items() if isinstance(v, numbers.Real)})
    out = {}
    for d in gathered[rank():] + gathered[:rank()]:  # this rank's keys first, in its order
        for k in d:
            if k not in out:
                vs = [g[k] for g in gathered if k in g]
                out[k] = sum(vs) / len(vs)
    return {**{k: v for k, v in values.items() if k not in out}, **out}


def broadcast_tensors(state, src: int = 0) -> None:
    """Overwrite every tensor in a (nested) state dict with rank `src`'s, in place; state dicts
    alias the modules' parameters and buffers, so the modules become identical (what DDP does at
    construction)."""
    if not is_distributed():
        return
    if isinstance(state, torch.Tensor):
        # through a buffer and an in-place copy, so that the tensor's version counter moves:
        # caches keyed on it (the folded frozen BN of adapters/models/frozen_bn.py) see the change
        buf = state.detach().clone(memory_format=torch.contiguous_format)
        dist.broadcast(buf, src=src)
        with torch.no_grad():
            state.copy_(buf)
    elif isinstance(state, dict):
        for v in state.values():
            broadcast_tensors(v, src)
    elif isinstance(state, (list, tuple)):
        for v in state:
            broadcast_tensors(v, src)


def rank_seed(seed: int) -> int:
    """The RNG seed of rank r > 0 (rank 0 keeps the 1-process stream): RoI and anchor sampling
    must not draw the same random numbers on every rank."""
    import numpy as np

    return int(np.random.SeedSequence([seed, rank()]).generate_state(1)[0])
