"""Adapter-only checkpoints: the adapters' config as JSON and their weights as safetensors."""

from __future__ import annotations

import json
import os
from typing import Optional

import torch
from torch import nn

from .. import __version__
from .config import AdapterConfig, FusionConfig
from .distributed import copy_into, is_sharded, writing_files
from .fusion import add_fusion, fusion_configs, fusion_state_dict
from .model import adapter_configs, adapter_state_dict, add_adapters, remove_adapter, set_active_adapter

CONFIG_FILE = "fastadapter_config.json"
WEIGHTS_FILE = "adapters.safetensors"


def fill_weights(what: str, targets: dict[str, torch.Tensor], weights: dict[str, torch.Tensor]) -> None:
    """Copy ``weights[k]`` into ``targets[k]`` (a parameter, whole or an FSDP2 shard) for every
    name k, once both are known to hold the same names and shapes: on a mismatch nothing is
    copied, and the error names ``what`` ("adapter 'a'") and the first names or the shape."""
    missing, unexpected = sorted(set(targets) - set(weights)), sorted(set(weights) - set(targets))
    if missing or unexpected:
        raise ValueError(f"{what} does not fit this model: missing {missing[:4]}, unexpected {unexpected[:4]}")
    for k, p in targets.items():
        if tuple(weights[k].shape) != tuple(p.shape):  # a DTensor's shape is the whole tensor's
            raise ValueError(f"{what}: {k} has shape {tuple(weights[k].shape)}, the model needs {tuple(p.shape)}")
    for k, p in targets.items():
        copy_into(p, weights[k])


def _named(weights: dict[str, torch.Tensor], part: str) -> dict[str, torch.Tensor]:
    """The entries of ``weights`` whose names contain ``part``."""
    return {k: v for k, v in weights.items() if part in k}


def _model_info(model: nn.Module) -> dict:
    config = getattr(model, "config", None)
    return {
        "model_type": getattr(config, "model_type", None),
        "hidden_size": getattr(config, "hidden_size", None) or getattr(config, "dim", None),
    }


def save_adapters(model: nn.Module, directory: str, name: Optional[str] = None) -> None:
    """Write adapter ``name`` (or all adapters) of ``model`` to ``directory``, with the fusion
    layers over adapters among them; never the base model.
    On a model sharded by FSDP2 every rank must call it: the adapters are gathered, rank 0
    writes them whole, and every rank returns once they are written."""
    from safetensors.torch import save_file

    configs = adapter_configs(model)
    if not configs:
        raise ValueError("the model has no adapters to save")
    names = [name] if name is not None else list(configs)
    for n in names:
        if n not in configs:
            raise ValueError(f"no adapter named {n!r}; the model has: {', '.join(configs)}")
    tensors = {}
    for n in names:  # sharded by FSDP2: gathered on every rank, written by rank 0
        tensors.update({k: v.contiguous().cpu() for k, v in adapter_state_dict(model, n).items()})
    fusions = {f: (fused, config) for f, (fused, config) in fusion_configs(model).items() if set(fused) <= set(names)}
    for f in fusions:  # the fusion layers over the adapters saved
        tensors.update({k: v.contiguous().cpu() for k, v in fusion_state_dict(model, f).items()})
    with writing_files(model) as writes:
        if writes:
            os.makedirs(directory, exist_ok=True)
            meta = {
                "format": "fastadapter",
                "version": __version__,
                **_model_info(model),
                "adapters": {n: configs[n].to_dict() for n in names},
                "fusions": {f: {"adapters": fused, "config": config.to_dict()} for f, (fused, config) in fusions.items()},
            }
            with open(os.path.join(directory, CONFIG_FILE), "w") as f:
                json.dump(meta, f, indent=2)
            save_file(tensors, os.path.join(directory, WEIGHTS_FILE))


def load_adapters(model: nn.Module, directory: str, name: Optional[str] = None) -> list[str]:
    """Add the adapters saved in ``directory`` (all, or only ``name``) to ``model``.

    The model must match the one they were saved from (model type and hidden size); on
    any mismatch nothing is added. Returns the names loaded; the last one is active.

    A model sharded by FSDP2 cannot take new parameters: there the adapters must have been
    added (same names, same configs) before sharding, and their shards are filled in.
    """
    from safetensors.torch import load_file

    with open(os.path.join(directory, CONFIG_FILE)) as f:
        meta = json.load(f)
    if meta.get("format") != "fastadapter":
        raise ValueError(f"{directory} is not a fastadapter checkpoint (format {meta.get('format')!r})")
    info = _model_info(model)
    for key in ("model_type", "hidden_size"):
        if meta.get(key) is not None and info[key] is not None and meta[key] != info[key]:
            raise ValueError(
                f"adapters in {directory} were saved from a model with {key}={meta[key]!r}, this model has {info[key]!r}"
            )
    saved = meta["adapters"]
    names = [name] if name is not None else list(saved)
    for n in names:
        if n not in saved:
            raise ValueError(f"{directory} has no adapter {n!r}; it has: {', '.join(saved)}")
        if n in adapter_configs(model) and not is_sharded(model):
            raise ValueError(f"the model already has an adapter named {n!r}")
    weights = load_file(os.path.join(directory, WEIGHTS_FILE))
    if is_sharded(model):
        _load_into_shards(model, directory, names, saved, weights)
        params = dict(model.named_parameters())
        for f in set(meta.get("fusions", {})) & set(fusion_configs(model)):  # added before sharding
            part = f"adapter_fusion_layer.{f}."
            fill_weights(f"fusion layer {f!r}", _named(params, part), _named(weights, part))
        return names
    added = []
    try:
        for n in names:
            add_adapters(model, AdapterConfig.from_dict(saved[n]), n)
            added.append(n)
            fill_weights(f"adapter {n!r}", adapter_state_dict(model, n), _named(weights, f"adapters.{n}."))
        for f, entry in meta.get("fusions", {}).items():
            if set(entry["adapters"]) <= set(adapter_configs(model)) and f not in fusion_configs(model):
                _load_fusion(model, f, entry, weights)
    except Exception:
        for n in added:
            remove_adapter(model, n)  # and the fusion layers over it
        raise
    return names


def _load_fusion(model: nn.Module, name: str, entry: dict, weights: dict) -> None:
    add_fusion(model, entry["adapters"], FusionConfig.load(entry["config"]), name=name)
    params = dict(model.named_parameters())
    own = {k: params[k] for k in fusion_state_dict(model, name)}
    fill_weights(f"fusion layer {name!r}", own, _named(weights, f"adapter_fusion_layer.{name}."))


def _load_into_shards(model: nn.Module, directory: str, names: list[str], saved: dict, weights: dict) -> None:
    """Fill the shards of adapters that a sharded model already has with saved weights."""
    configs = adapter_configs(model)
    params = dict(model.named_parameters())
    for n in names:
        if n not in configs:
            raise ValueError(f"the model is sharded (FSDP2) and has no adapter {n!r} to load into: add the adapters "
                             f"before sharding, then load them (it has: {', '.join(configs) or 'none'})")  # fmt: skip
        if configs[n].to_dict() != AdapterConfig.from_dict(saved[n]).to_dict():
            raise ValueError(f"adapter {n!r} of the sharded model has another config than the one in {directory}")
        fill_weights(f"adapter {n!r}", _named(params, f"adapters.{n}."), _named(weights, f"adapters.{n}."))
    set_active_adapter(model, names[-1])
