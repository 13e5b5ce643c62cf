"""``fastadapter train --fsdp`` / ``--ddp``: one training run over several processes.

Started by ``torchrun --nproc_per_node N -m fastadapter.cli train ... --fsdp`` (or
``--ddp``), each process takes the part of every global batch with its rank (rows rank,
rank + N, ...), its loss weighted so that the averaged gradient is the one-process
gradient of the whole batch. Held-out examples are shared out the same way and their
counts summed, with every process running the same number of batches (FSDP2 gathers each
layer's weights in every forward: a process that stopped early would leave the others
waiting). Rank 0 prints and writes the files. The processes talk through gloo and train on
the CPU, as the one-process run does.
"""

from __future__ import annotations

import os

import torch
from torch import nn

MODES = ("fsdp", "ddp")


class Processes:
    """The processes of a run (one when ``mode`` is None) and what they share."""

    def __init__(self, mode: str | None):
        self.mode = mode
        self.rank, self.world = 0, 1
        if mode is None:
            return
        if mode not in MODES:
            raise SystemExit(f"unknown mode {mode!r}: {' or '.join(MODES)}")
        if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
            raise SystemExit(f"--{mode} runs under torchrun, one process per part of the batch, e.g. "
                             f"torchrun --nproc_per_node 2 -m fastadapter.cli train --{mode} ...")  # fmt: skip
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group("gloo")
        self.rank, self.world = dist.get_rank(), dist.get_world_size()

    @property
    def main(self) -> bool:
        return self.rank == 0

    def print(self, *args, **kwargs) -> None:
        if self.main:
            print(*args, **kwargs)

    def wrap(self, model: nn.Module) -> nn.Module:
        """The model to call: sharded (FSDP2), replicated (DDP) or itself. Adapters first."""
        if self.mode == "fsdp":
            import fastadapter as fa

            return fa.shard_model(model)
        if self.mode == "ddp":
            from torch.nn.parallel import DistributedDataParallel

            return DistributedDataParallel(model)
        return model

    @staticmethod
    def inner(model: nn.Module) -> nn.Module:
        """The Hugging Face model inside a DDP wrapper (FSDP2 keeps the model itself)."""
        return getattr(model, "module", model)

    def part(self, rows: list) -> tuple[list, float]:
        """This process's rows of a global batch, and the factor that makes the mean of the
        processes' weighted mean losses the mean loss of the whole batch."""
        if len(rows) < self.world:
            raise SystemExit(f"a batch of {len(rows)} rows cannot be shared by {self.world} processes: raise --batch-size")
        mine = rows[self.rank :: self.world]
        return mine, len(mine) * self.world / len(rows)

    @staticmethod
    def weighted(loss: torch.Tensor, weight: float) -> torch.Tensor:
        """This process's loss as its share of the batch's mean (``weight`` from :meth:`part`)."""
        return loss if weight == 1.0 else loss * weight

    def mean(self, value: float) -> float:
        """The mean over the processes of a weighted loss: the whole batch's loss."""
        return self.sum(value)[0] / self.world

    def save_adapters(self, model: nn.Module, directory: str, name: str | None) -> None:
        """``fastadapter.save_adapters`` as the run's processes must call it: every process on
        a sharded model (each gathers, the first writes), the first alone otherwise."""
        import fastadapter as fa

        if self.mode == "fsdp" or self.main:
            fa.save_adapters(self.inner(model), directory, name=name)

    def eval_batches(self, rows: list, batch_size: int) -> list[tuple[list, int]]:
        """This process's share of held-out ``rows`` as (batch, rows that count): every
        process gets the same number of batches, the short ones filled with a repeated row
        that is not counted."""
        mine = rows[self.rank :: self.world]
        longest = -(-len(rows) // self.world)
        out = []
        for i in range(0, longest, batch_size):
            batch = mine[i : i + batch_size]
            counted = len(batch)
            want = min(batch_size, longest - i)
            batch = batch + [rows[0]] * (want - counted)
            out.append((batch, counted))
        return out

    def sum(self, *values: float) -> list[float]:
        """Each value summed over the processes."""
        if self.mode is None:
            return list(values)
        import torch.distributed as dist

        t = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(t)
        return t.tolist()

    def gather(self, value: float) -> list[float]:
        """Each process's ``value``, in rank order."""
        if self.mode is None:
            return [value]
        import torch.distributed as dist

        out = [None] * self.world
        dist.all_gather_object(out, value)
        return out

    def barrier(self) -> None:
        if self.mode is not None:
            import torch.distributed as dist

            dist.barrier()

    def close(self) -> None:
        if self.mode is not None:
            import torch.distributed as dist

            dist.destroy_process_group()


def parameter_mib(model: nn.Module) -> float:
    """MiB of parameters this process holds: its shards under FSDP2, everything otherwise."""
    total = 0
    for p in model.parameters():
        local = p.to_local() if hasattr(p, "to_local") else p
        total += local.numel() * local.element_size()
    return total / 2**20


def peak_rss_mib() -> float:
    """This process's peak resident memory so far, MiB (Linux: ru_maxrss is in KiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
