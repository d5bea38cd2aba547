"""Data parallelism: this process's place in a ``torchrun`` process group (torch imported only under torchrun)."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["Distributed"]


@dataclass
class Distributed:
    """This process's place in a data-parallel run (``rank 0 of 1`` without torchrun).

    ``barrier`` synchronises all processes (a no-op for one process); tests may pass their own.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    barrier: Callable[[], None] = lambda: None
    initialised: bool = False

    @classmethod
    def from_env(cls, device: str | None) -> Distributed:
        """Join the process group described by torchrun's ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``.

        The backend is ``nccl`` when CUDA is available and ``device`` is a CUDA device, else ``gloo``.
        """
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        import torch
        import torch.distributed as dist

        rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
        cuda = torch.cuda.is_available() and device is not None and torch.device(device).type == "cuda"
        created = False
        if not dist.is_initialized():
            if cuda:
                torch.cuda.set_device(local)
            dist.init_process_group("nccl" if cuda else "gloo")
            created = True
        return cls(rank=rank, world_size=world, local_rank=local, barrier=dist.barrier, initialised=created)

    def close(self) -> None:
        """Leave the process group if :meth:`from_env` created it."""
        if self.initialised:
            import torch.distributed as dist
            dist.destroy_process_group()
            self.initialised = False
