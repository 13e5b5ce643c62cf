"""AdapterFusion layers in a Hugging Face model: adding, removing, training and saving them.

A fusion layer over adapters ``a, b, ...`` (``fastadapter.AdapterFusion``: query, key and
value projections) sits in an ``adapter_fusion_layer`` ModuleDict on every site owner that
holds one of the adapters, under AdapterHub's name for it (``"a,b"`` unless the ``Fuse``
names it), so parameter names read ``...adapter_fusion_layer.a,b.query.weight`` as
AdapterHub's do. ``set_active_adapter(model, Fuse("a", "b"))`` runs it.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from torch import nn

from ..composition import Fuse, Stack
from ..modules import AdapterFusion
from .config import FusionConfig
from .distributed import full, is_sharded
from .model import _CONFIGS, _FUSIONS, Block, active_adapter, find_sites, mark_trainable, set_active_adapter

LAYERS = "adapter_fusion_layer"


def _as_fuse(names) -> Fuse:
    if isinstance(names, Fuse):
        return names
    if isinstance(names, str):
        names = names.split(",")
    return Fuse(*names)


def fusion_configs(model: nn.Module) -> dict[str, tuple[list[str], FusionConfig]]:
    """The fusion layers of ``model``: {name: (the fused adapters' names, config)}."""
    return dict(model.__dict__.get(_FUSIONS, {}))


def add_fusion(model: nn.Module, names: Union[Fuse, Sequence[str], str], config: Union[str, dict, FusionConfig, None] = None,
               name: Optional[str] = None) -> str:  # fmt: skip
    """Add an AdapterFusion layer over the adapters ``names`` (a ``Fuse``, a list, or
    ``"a,b"``) to every site that holds one of them. ``config``: ``"dynamic"`` (default),
    ``"static"``, a dict or a ``FusionConfig``. Returns the fusion layer's name; activate it
    with ``set_active_adapter(model, Fuse(...))``. The fusion layers take the adapters'
    dtype and device; W_v starts at the identity, so a fresh dynamic fusion of one adapter
    is that adapter."""
    fuse = _as_fuse(names)
    if name is not None:
        fuse = Fuse(*fuse.children, name=name)
    if len(fuse) < 2:
        raise ValueError(f"a fusion layer fuses at least two adapters, got {fuse!r}")
    if any(isinstance(c, Block) and not isinstance(c, Stack) for c in fuse):
        raise ValueError(f"a Fuse holds adapter names and Stacks of them, got {fuse!r}")
    if is_sharded(model):
        raise ValueError("add fusion layers before sharding the model (fastadapter.shard_model)")
    config = FusionConfig.load(config)
    configs = model.__dict__.get(_CONFIGS, {})
    for n in fuse.names():
        if n not in configs:
            raise ValueError(f"{fuse!r} names no adapter {n!r}; the model has: {', '.join(configs) or 'none'}")
    placements = {configs[n].placement for n in fuse.names()}
    if placements != {"pfeiffer"} and placements != {"houlsby"}:
        raise ValueError(f"a fusion layer fuses pfeiffer or houlsby adapters of one placement, got {sorted(placements)}")
    fusions = model.__dict__.setdefault(_FUSIONS, {})
    if fuse.name in fusions:
        raise ValueError(f"the model already has a fusion layer {fuse.name!r}")
    dropout = config.dropout_prob
    if dropout is None:  # as AdapterHub: the model's attention dropout (GPT-2: attn_pdrop), else none
        model_config = getattr(model, "config", None)
        dropout = getattr(model_config, "attention_probs_dropout_prob", None) or getattr(model_config, "attn_pdrop", 0.0) or 0.0
    for site in find_sites(model):
        adapters = getattr(site.owner, "adapters", {})
        held = [adapters[n] for n in fuse.names() if n in adapters]
        if not held:
            continue
        w = held[0].down.weight
        layer = AdapterFusion(site.hidden_size, query=config.query, key=config.key, value=config.value,
                              value_initialized=config.value_initialized, temperature=config.temperature,
                              dropout=dropout, device=w.device, dtype=w.dtype)  # fmt: skip
        layer.train(site.owner.training)  # its score dropout follows the model's mode
        if not isinstance(getattr(site.owner, LAYERS, None), nn.ModuleDict):
            setattr(site.owner, LAYERS, nn.ModuleDict())
        getattr(site.owner, LAYERS)[fuse.name] = layer
    fusions[fuse.name] = (fuse.names(), config)
    return fuse.name


def remove_fusion(model: nn.Module, name) -> None:
    """Delete fusion layer ``name`` (a name or a ``Fuse``) from every site."""
    name = name if isinstance(name, str) else _as_fuse(name).name
    fusions = model.__dict__.get(_FUSIONS, {})
    if name not in fusions:
        raise ValueError(f"no fusion layer {name!r}; the model has: {', '.join(fusions) or 'none'}")
    active = active_adapter(model)
    if isinstance(active, Block) and any(isinstance(b, Fuse) and b.name == name for b in _walk(active)):
        set_active_adapter(model, None)
    for site in find_sites(model):
        layers = getattr(site.owner, LAYERS, None)
        if isinstance(layers, nn.ModuleDict) and name in layers:
            del layers[name]
    del fusions[name]


def _walk(block: Block):
    yield block
    for c in block:
        if isinstance(c, Block):
            yield from _walk(c)


def fusion_state_dict(model: nn.Module, name: Optional[str] = None) -> dict[str, torch.Tensor]:
    """The fusion layers' parameters (all, or those of fusion ``name``) under their model names."""
    fusions = model.__dict__.get(_FUSIONS, {})
    if name is not None and name not in fusions:
        raise ValueError(f"no fusion layer {name!r}; the model has: {', '.join(fusions) or 'none'}")
    out = {}
    for pname, p in model.named_parameters():
        head, sep, rest = pname.partition(f"{LAYERS}.")
        if sep and (name is None or rest.startswith(f"{name}.")):
            out[pname] = full(p.detach())
    return out


def mark_only_fusion_trainable(model: nn.Module, train_head: bool = True) -> dict[str, int]:
    """Freeze everything but the fusion layers (and, if asked, the task head): AdapterFusion's
    second stage, which trains the fusion over adapters trained before. Returns parameter counts."""
    counts = mark_trainable(model, (f".{LAYERS}.",), train_head)
    counts["fusion"] = sum(p.numel() for n, p in model.named_parameters() if f".{LAYERS}." in f".{n}")
    return counts


def fusion_regularization(model: nn.Module) -> torch.Tensor:
    """The sum over the fusion layers of configs with ``regularization`` of 0.01 * ||W_v - I||^2,
    AdapterFusion's term that keeps W_v near the identity (add it to the loss)."""
    fusions = model.__dict__.get(_FUSIONS, {})
    terms = []
    for site in find_sites(model):
        for fname, layer in getattr(site.owner, LAYERS, {}).items():
            if fusions[fname][1].regularization and layer.value is not None and layer.value.weight.requires_grad:
                terms.append(layer.regularization())
    if not terms:
        return torch.zeros((), device=next(model.parameters()).device)
    return torch.stack(terms).sum()
