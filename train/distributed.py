"""The process group of a data-parallel run and the few collectives the trainer needs.

`torchrun --nproc-per-node N -m pmp pretrain ...` starts N processes with RANK, WORLD_SIZE, LOCAL_RANK and
MASTER_ADDR/PORT set; `process_group` joins them (NCCL on GPUs, gloo on CPU) for the duration of a run. Without
torchrun the context has world size 1 and every collective is a no-op, so the trainer has one code path.

Rules the trainer follows with it:
- rank 0 is the only writer of the run directory (run.json, metrics, private/, checkpoints, final/); the other ranks
  read what it wrote (RUN must be on a file system every rank sees, as for any multi-node checkpointing);
- every decision that could differ between ranks is taken by rank 0 and broadcast (`main_first`), or checked to
  agree (`agree`), so ranks never silently train different things;
- an error on rank 0 inside `main_first` reaches every rank as an error (no rank waits forever for a peer that
  stopped); a rank that dies outright takes the job down (torchrun stops the others).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as dist

from pmp.config import TrainConfig

# train.parallel=auto under torchrun: DDP keeps a full replica per rank (fp32 weights + gradients + AdamW moments =
# 16 B per parameter in the dense warm-up, 35 GB at 2e9 parameters before activations: what an 80 GB GPU still
# holds); above this, FSDP shards the model.
AUTO_FSDP_PARAMETERS = 2_000_000_000

T = TypeVar("T")


class RankFailed(ValueError):
    """Another rank (rank 0) stopped with an error; this rank stops with it."""


class RanksDisagree(ValueError):
    """Ranks that must hold the same thing (mask, weights, data) do not."""


@dataclass
class DistContext:
    """Who this process is in the job. world == 1: a single process, collectives are no-ops."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: str | None = None
    failed_together: bool = False  # every rank is stopping at the same point (see `stop_together`)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    @property
    def _comm_device(self) -> torch.device:
        return self.device if self.backend == "nccl" else torch.device("cpu")

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def broadcast(self, obj: T) -> T:
        """Rank 0's `obj` on every rank (small picklable objects only: sent between the job's own processes)."""
        if not self.distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0, device=self._comm_device)
        return box[0]

    def gather(self, obj) -> list:
        """Every rank's `obj`, in rank order, on every rank."""
        if not self.distributed:
            return [obj]
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sum over ranks, in float64."""
        if not self.distributed:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self._comm_device)
        dist.all_reduce(t)
        return t.tolist()

    def max(self, value: float) -> float:
        if not self.distributed:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self._comm_device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return float(t)

    def agree(self, what: str, value: str, hint: str = "") -> None:
        """Raise RanksDisagree on every rank unless every rank holds the same `value` (a fingerprint)."""
        values = self.gather(value)
        if len(set(values)) > 1:
            listing = ", ".join(f"rank {r}: {v[:16]}" for r, v in enumerate(values))
            self.failed_together = True
            raise RanksDisagree(f"the ranks hold different {what} ({listing}); stopping rather than training "
                                f"inconsistent replicas{'; ' + hint if hint else ''}")

    def main_first(self, fn: Callable[[], T]) -> T:
        """Run `fn` on rank 0 while the other ranks wait, then give them its (small, picklable) result. An error
        on rank 0 is raised there as itself and on every other rank as RankFailed with its message."""
        if not self.distributed:
            return fn()
        if self.is_main:
            try:
                result = fn()
            except BaseException as e:
                self.broadcast(("error", f"{type(e).__name__}: {e}"))
                self.failed_together = True
                raise
            self.broadcast(("ok", result))
            return result
        status, payload = self.broadcast(None)
        if status == "error":
            self.failed_together = True
            raise RankFailed(f"rank 0 stopped ({payload})")
        return payload

    def stop_together(self) -> None:
        """Mark an error every rank raises at the same point (e.g. a non-finite global loss)."""
        self.failed_together = True


def resolve_device(name: str, local_rank: int = 0, world: int = 1) -> torch.device:
    """train.device -> the device of this rank (cuda:LOCAL_RANK under torchrun)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"train.device={name} but CUDA is not available; use cpu or auto")
    if dev.type == "cuda" and world > 1:
        if dev.index is not None:
            raise ValueError(f"train.device={name} under torchrun: use auto or cuda (rank r trains on "
                             "cuda:LOCAL_RANK)")
        if local_rank >= torch.cuda.device_count():
            raise ValueError(f"LOCAL_RANK {local_rank} but this machine has {torch.cuda.device_count()} GPUs: "
                             "launch at most that many processes per node (torchrun --nproc-per-node)")
        dev = torch.device("cuda", local_rank)
    return dev


def resolve_parallel(requested: str, world: int, parameters: int) -> str:
    """train.parallel -> none | ddp | fsdp for this job."""
    if world == 1:
        return "none"
    if requested == "none":
        raise ValueError(f"train.parallel=none but the job has {world} ranks (torchrun): use auto, ddp or fsdp, or "
                         "launch one process without torchrun")
    if requested == "auto":
        return "ddp" if parameters < AUTO_FSDP_PARAMETERS else "fsdp"
    return requested


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name, "")
    try:
        return int(raw) if raw else default
    except ValueError:
        raise ValueError(f"environment variable {name}={raw!r} is not an integer (set by torchrun)") from None


@contextmanager
def process_group(t: TrainConfig) -> Iterator[DistContext]:
    """The job's context: joins the torchrun process group (and leaves it afterwards) when WORLD_SIZE > 1, reuses
    one the caller already initialized, else a single-process context."""
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
        local = _env_int("LOCAL_RANK", rank)
        device = resolve_device(t.device, local, world)
        yield DistContext(rank, world, local, device, dist.get_backend())
        return
    world = _env_int("WORLD_SIZE", 1)
    if world <= 1:
        yield DistContext(device=resolve_device(t.device))
        return
    if not dist.is_available():
        raise ValueError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    rank, local = _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
    device = resolve_device(t.device, local, world)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
        dist.init_process_group(backend, rank=rank, world_size=world, device_id=device)
    else:
        dist.init_process_group(backend, rank=rank, world_size=world)
    ctx = DistContext(rank, world, local, device, backend)
    try:
        yield ctx
    except BaseException:
        # Tearing the group down while a peer is still inside a collective can deadlock (pytorch#75097,
        # torchtitan#1342), so after an error only when every rank stopped at the same point; otherwise the
        # process just exits and torchrun stops the others.
        if ctx.failed_together:
            dist.destroy_process_group()
        raise
    dist.barrier()  # after success: all together
    dist.destroy_process_group()
