"""Adapters past one process: FSDP2 (``torch.distributed.fsdp.fully_shard``) and DDP.

Under FSDP2 a unit's parameters are sharded DTensors except while its forward or backward
runs, when they are gathered into plain tensors: every fastadapter op runs inside a
layer's forward on those plain tensors. What reads adapter weights outside a forward
(checkpoints) gathers them here, and what would read another unit's weights (the decoder
site's handover to the next layer's norm) does not run under FSDP2 (fastadapter/hf/decoder.py).

:func:`shard_model` shards each transformer layer and then the root, after the adapters
are added (FSDP2 manages only the parameters a module has when it is sharded).
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

try:
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor, distribute_tensor
except ImportError:  # a torch built without distributed
    dist, DTensor, distribute_tensor = None, None, None


def is_sharded(model: nn.Module) -> bool:
    """Whether any parameter of ``model`` is a DTensor (FSDP2 has sharded it)."""
    return DTensor is not None and any(isinstance(p, DTensor) for p in model.parameters())


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor: gathered from every rank for a DTensor (a collective: every rank
    must call it), ``t`` itself otherwise."""
    return t.full_tensor() if DTensor is not None and isinstance(t, DTensor) else t


def copy_into(p: torch.Tensor, value: torch.Tensor) -> None:
    """``p.copy_(value)`` for a whole ``value``; into a DTensor, each rank keeps its own shard
    of it (no communication: every rank holds the whole value)."""
    with torch.no_grad():
        if DTensor is not None and isinstance(p, DTensor):
            p.copy_(distribute_tensor(value.to(p.dtype), p.device_mesh, p.placements, src_data_rank=None))
        else:
            p.copy_(value)


def writes_files() -> bool:
    """Whether this process writes shared files: rank 0, or the only process."""
    return dist is None or not dist.is_initialized() or dist.get_rank() == 0


def barrier() -> None:
    if dist is not None and dist.is_initialized():
        dist.barrier()


@contextlib.contextmanager
def writing_files(model: nn.Module):
    """Around writing files of ``model``'s (gathered) adapters: yields whether this process
    writes them. On a model sharded by FSDP2 rank 0 does, and every rank leaves the block
    once they are written; otherwise the caller does."""
    sharded = is_sharded(model)
    yield not sharded or writes_files()
    if sharded:
        barrier()


def shard_model(model: nn.Module, mesh=None, **fully_shard_kwargs) -> nn.Module:
    """Shard ``model`` with FSDP2: each transformer layer a unit, then the root (the
    embeddings, the final norm and the head). Add or load the adapters first; the frozen
    and the trainable parameters of a layer share its unit (FSDP2 takes both). ``mesh`` and
    the keyword arguments go to ``fully_shard``. Returns the model, now an ``FSDPModule``."""
    from torch.distributed.fsdp import fully_shard

    from .sites import layers

    units = layers(model)
    if not units:
        raise ValueError(f"found no transformer layers to shard in {type(model).__name__}")
    for layer in units:
        fully_shard(layer, mesh=mesh, **fully_shard_kwargs)
    fully_shard(model, mesh=mesh, **fully_shard_kwargs)
    return model
