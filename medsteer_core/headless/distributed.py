"""Scale-out for the headless route: ``Shard`` (this process's rank under ``torchrun`` /
``accelerate launch``) and the device checks.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from ..errors import MedSteerError


# ================================================================================ scale-out
@dataclass(frozen=True)
class Shard:
    """This process's place in a ``torchrun`` / ``accelerate launch`` job (rank 0 of 1 otherwise).

    Units of work are dealt out round-robin: unit ``i`` belongs to rank ``i % world``. Only small
    CPU objects cross processes, so the process group always uses gloo (also next to GPUs).
    """

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @classmethod
    def from_environment(cls) -> Shard:
        """Join the process group described by ``WORLD_SIZE`` / ``RANK`` / ``MASTER_ADDR`` (if any)."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group("gloo")
        return cls(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))

    @property
    def main(self) -> bool:
        return self.rank == 0

    def owns(self, unit: int) -> bool:
        return unit % self.world == self.rank

    def gather(self, obj) -> list:
        """Every rank's ``obj``, in rank order (``[obj]`` in a single process)."""
        if self.world == 1:
            return [obj]
        import torch.distributed as dist

        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()


# ================================================================================ loading
def check_device(device: str | torch.device | None) -> torch.device | None:
    """The ``torch.device`` that ``device`` names, checked to exist here (``None`` for ``"auto"``).

    Raises:
        MedSteerError: an unknown device name, or a device this machine or torch build lacks
            (``cuda`` without CUDA, ``cuda:3`` on a 2-GPU machine, ``mps`` off Apple silicon).
    """
    if device is None or str(device) == "auto":
        return None
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise MedSteerError(
            f"unknown device {str(device)!r}: pass auto, cpu, cuda, cuda:N (a GPU index) or mps"
        ) from None
    if parsed.type == "cpu":
        return parsed
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise MedSteerError(
                f"device {str(device)!r} asked for, but CUDA is not available here (torch {torch.__version__}, "
                f"CUDA build: {torch.version.cuda or 'no'}): pass --device cpu, or --device auto"
            )
        count = torch.cuda.device_count()
        if parsed.index is not None and parsed.index >= count:
            raise MedSteerError(f"device {str(device)!r} does not exist: this machine has {count} CUDA device(s)")
        return parsed
    backend = getattr(torch.backends, parsed.type, None) or getattr(torch, parsed.type, None)
    available = getattr(backend, "is_available", None)
    if available is None or not available():
        raise MedSteerError(
            f"device {str(device)!r} is not available here: pass --device cpu, cuda (with a GPU) or auto"
        )
    return parsed


def _resolve_device(device: str | torch.device | None, shard: Shard) -> torch.device:
    device = check_device(device)
    if device is None:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", shard.local_rank)
    return device
