"""Reading and writing AdapterHub (``adapters`` package) bottleneck-adapter checkpoints.

A directory written by AdapterHub's ``save_adapter`` holds ``adapter_config.json`` and
``pytorch_adapter.bin`` (or ``adapter.safetensors``) with parameters named
``...layer.<i>.<site>.adapters.<name>.adapter_down.0.weight`` / ``adapter_up.weight``
(decoders: ``...layers.<i>.attention_adapters.adapters.<name>...`` and ``output_adapters``).
The seq_bn (pfeiffer), double_seq_bn (houlsby) and par_bn (parallel) configurations map
onto fastadapter's placements; anything else raises an error that names it. A directory
written by ``save_adapter_fusion`` holds ``adapter_fusion_config.json`` and
``pytorch_model_adapter_fusion.bin`` with ``...adapter_fusion_layer.<a,b>.query.weight`` and
the like, next to the adapters; both functions read and write those too.
"""

from __future__ import annotations

import json
import math
import os
import re
from typing import Any, Optional

import torch
from torch import nn

from .. import __version__
from ..activations import canonical_activation
from .checkpoint import fill_weights
from .config import AdapterConfig, FusionConfig
from .distributed import writing_files
from .fusion import add_fusion, fusion_configs, fusion_state_dict, remove_fusion
from .model import adapter_configs, adapter_state_dict, add_adapters, remove_adapter
from .sites import find_sites

CONFIG_FILE = "adapter_config.json"
BIN_FILE = "pytorch_adapter.bin"
SAFE_FILE = "adapter.safetensors"
FUSION_CONFIG_FILE = "adapter_fusion_config.json"
FUSION_BIN_FILE = "pytorch_model_adapter_fusion.bin"
FUSION_SAFE_FILE = "model_adapter_fusion.safetensors"

# BERT-family: ...layer.<i>.attention.output / output (DistilBERT: attention_adapters /
# output_adapters); decoders: ...layers.<i> (Llama family) or ...h.<i> (GPT-2) with
# attention_adapters / output_adapters
_KEY = re.compile(
    r"(?:^|\.)(?:layer|layers|h)\.(\d+)\.(attention\.output|output|attention_adapters|output_adapters)\.adapters\."
    r"([^.]+)\.(adapter_down\.0|adapter_up)\.(weight|bias)$"
)
_FUSION_KEY = re.compile(
    r"(?:^|\.)(?:layer|layers|h)\.(\d+)\.(attention\.output|output|attention_adapters|output_adapters)\.adapter_fusion_layer\."
    r"([^.]+)\.(query|key|value)\.(weight|bias)$"
)
_KIND = {"attention.output": "attention", "attention_adapters": "attention", "output": "output", "output_adapters": "output"}
_PARAM = {"adapter_down.0": "down", "adapter_up": "up"}

# What AdapterHub's string shorthands mean.
_SHORTHANDS = {
    "seq_bn": "pfeiffer",
    "pfeiffer": "pfeiffer",
    "double_seq_bn": "houlsby",
    "houlsby": "houlsby",
    "par_bn": "parallel",
}

# BnConfig fields fastadapter does not implement, with the value that means "off".
_UNSUPPORTED = {
    "use_gating": False,
    "phm_layer": False,
    "ln_before": False,
    "ln_after": False,
    "inv_adapter": None,
    "cross_adapter": False,
    "adapter_residual_before_ln": False,
    "dropout": 0.0,
    "stochastic_depth": 0.0,
}

_HUB_ACTIVATION = {"relu": "relu", "gelu": "gelu", "gelu_tanh": "gelu_new", "silu": "swish", "tanh": "tanh", "identity": "linear"}

_FLAGS = {
    "pfeiffer": dict(mh_adapter=False, output_adapter=True, original_ln_before=True, original_ln_after=True, is_parallel=False),
    "houlsby": dict(mh_adapter=True, output_adapter=True, original_ln_before=False, original_ln_after=True, is_parallel=False),
    "parallel": dict(mh_adapter=False, output_adapter=True, original_ln_before=False, original_ln_after=True, is_parallel=True),
}

# The full BnConfig of adapters 1.3.0, so that its loader finds every field it reads.
_BN_DEFAULTS: dict[str, Any] = {
    "adapter_residual_before_ln": False,
    "cross_adapter": False,
    "dropout": 0.0,
    "factorized_phm_W": True,
    "factorized_phm_rule": False,
    "hypercomplex_nonlinearity": "glorot-uniform",
    "init_weights": "bert",
    "init_weights_seed": None,
    "inv_adapter": None,
    "inv_adapter_reduction_factor": None,
    "learn_phm": True,
    "leave_out": [],
    "ln_after": False,
    "ln_before": False,
    "phm_bias": True,
    "phm_c_init": "normal",
    "phm_dim": 4,
    "phm_init_range": 0.0001,
    "phm_layer": False,
    "phm_rank": 1,
    "residual_before_ln": True,
    "scaling": 1.0,
    "shared_W_phm": False,
    "shared_phm_rule": True,
    "stochastic_depth": 0.0,
    "use_gating": False,
}


def config_from_adapterhub(conf: Any) -> AdapterConfig:
    """The fastadapter config equal to an AdapterHub bottleneck config (dict or shorthand)."""
    if isinstance(conf, str):
        if conf not in _SHORTHANDS:
            raise ValueError(f"AdapterHub config {conf!r} is not one fastadapter can map; supported: {', '.join(_SHORTHANDS)}")
        return AdapterConfig(placement=_SHORTHANDS[conf])
    arch = conf.get("architecture", "bottleneck")
    if arch not in (None, "bottleneck"):
        raise ValueError(
            f"AdapterHub architecture {arch!r} is not a bottleneck adapter; fastadapter maps only bottleneck adapters"
        )
    unsupported = [f"{k}={conf[k]!r}" for k, off in _UNSUPPORTED.items() if conf.get(k, off) not in (off, None)]
    scaling = conf.get("scaling", 1.0)
    if isinstance(scaling, str):
        unsupported.append(f"scaling={scaling!r} (learned scaling)")
    if conf.get("residual_before_ln", True) is not True:
        unsupported.append(f"residual_before_ln={conf.get('residual_before_ln')!r}")
    if unsupported:
        raise ValueError(f"AdapterHub adapter uses features fastadapter cannot map: {', '.join(unsupported)}")
    flags = {k: bool(conf.get(k, False)) for k in ("mh_adapter", "output_adapter", "original_ln_before", "is_parallel")}
    flags["original_ln_after"] = bool(conf.get("original_ln_after", True))
    placement = next((p for p, want in _FLAGS.items() if want == flags), None)
    if placement is None:
        raise ValueError(
            "AdapterHub adapter placement is none of seq_bn, double_seq_bn, par_bn: "
            + ", ".join(f"{k}={v}" for k, v in flags.items())
        )
    act = conf.get("non_linearity", "relu")
    try:
        activation = canonical_activation(act)
    except ValueError:
        raise ValueError(f"AdapterHub adapter uses non_linearity={act!r}, which fastadapter cannot map") from None
    return AdapterConfig(
        placement=placement,
        reduction_factor=conf.get("reduction_factor", 16),
        activation=activation,
        scaling=float(scaling),
        init="mam" if conf.get("init_weights") == "mam_adapter" else (conf.get("init_weights") or "bert"),
        leave_out=tuple(conf.get("leave_out") or ()),
    )


def _read_weights(directory: str, safe: str = SAFE_FILE, binary: str = BIN_FILE) -> dict[str, torch.Tensor]:
    safe, binary = os.path.join(directory, safe), os.path.join(directory, binary)
    if os.path.exists(safe):
        from safetensors.torch import load_file

        return load_file(safe)
    if os.path.exists(binary):
        return torch.load(binary, map_location="cpu", weights_only=True)
    raise FileNotFoundError(f"{directory} has neither {os.path.basename(safe)} nor {os.path.basename(binary)}")


def load_adapterhub(model: nn.Module, directory: str, name: Optional[str] = None) -> str:
    """Add the AdapterHub adapter saved in ``directory`` to ``model`` and make it active; or,
    for a directory AdapterHub's ``save_adapter_fusion`` wrote, add that fusion layer (its
    adapters must be in the model already; activate it with ``set_active_adapter(model,
    Fuse(...))``).

    Returns its name (``name``, else the name it was saved under). On any mismatch
    (model type, hidden size, missing or extra weights) nothing is added.
    """
    if os.path.exists(os.path.join(directory, FUSION_CONFIG_FILE)):
        return _load_fusion(model, directory, name)
    with open(os.path.join(directory, CONFIG_FILE)) as f:
        meta = json.load(f)
    config = config_from_adapterhub(meta.get("config", meta))
    _check_model(model, meta, "adapter")
    saved_name = meta.get("name")
    name = name or saved_name
    if not name:
        raise ValueError("the AdapterHub checkpoint names no adapter; pass name=")
    weights = _read_weights(directory)
    add_adapters(model, config, name)
    try:
        owners = {(s.layer, s.kind): s.owner for s in find_sites(model)}
        targets = {}  # checkpoint key -> this model's parameter
        for key in weights:
            m = _KEY.search(key)
            if m is None or (saved_name and m.group(3) != saved_name):
                raise ValueError(f"unexpected parameter {key!r} in the AdapterHub checkpoint")
            layer, kind = int(m.group(1)), _KIND[m.group(2)]
            owner = owners.get((layer, kind))
            if owner is None or name not in getattr(owner, "adapters", {}):
                raise ValueError(f"the AdapterHub checkpoint has {key!r}, but this model has no such adapter site")
            targets[key] = getattr(getattr(owner.adapters[name], _PARAM[m.group(4)]), m.group(5))
        fill_weights("the AdapterHub checkpoint", targets, weights)
        filled = {id(p) for p in targets.values()}
        expected = [p for o in owners.values() if name in getattr(o, "adapters", {}) for p in o.adapters[name].parameters()]
        missing = sum(id(p) not in filled for p in expected)
        if missing:
            raise ValueError(f"the AdapterHub checkpoint lacks {missing} of the adapter's {len(expected)} parameters")
    except Exception:
        remove_adapter(model, name)
        raise
    return name


def _check_model(model: nn.Module, meta: dict, what: str) -> None:
    model_config = getattr(model, "config", None)
    hidden = getattr(model_config, "hidden_size", None) or getattr(model_config, "dim", None)
    if meta.get("hidden_size") is not None and hidden is not None and meta["hidden_size"] != hidden:
        raise ValueError(f"the AdapterHub {what} is for hidden size {meta['hidden_size']}, this model has {hidden}")
    mtype = getattr(model_config, "model_type", None)
    if meta.get("model_type") and mtype and meta["model_type"] != mtype:
        raise ValueError(f"the AdapterHub {what} was saved from a {meta['model_type']!r} model, this is {mtype!r}")


def _load_fusion(model: nn.Module, directory: str, name: Optional[str]) -> str:
    """An AdapterHub fusion layer (``adapter_fusion_config.json`` and its weights) into ``model``."""
    with open(os.path.join(directory, FUSION_CONFIG_FILE)) as f:
        meta = json.load(f)
    _check_model(model, meta, "fusion layer")
    saved = meta.get("name") or ",".join(meta["adapter_names"])
    name = add_fusion(model, meta["adapter_names"], FusionConfig.load(meta.get("config")), name=name or saved)
    try:
        weights = _read_weights(directory, FUSION_SAFE_FILE, FUSION_BIN_FILE)
        owners = {(s.layer, s.kind): s.owner for s in find_sites(model)}
        targets = {}  # checkpoint key -> this model's parameter
        for key in weights:
            m = _FUSION_KEY.search(key)
            if m is None or m.group(3) != saved:
                raise ValueError(f"unexpected parameter {key!r} in the AdapterHub fusion checkpoint")
            layers = getattr(owners.get((int(m.group(1)), _KIND[m.group(2)])), "adapter_fusion_layer", {})
            if name not in layers or getattr(layers[name], m.group(4)) is None:
                raise ValueError(f"the AdapterHub fusion checkpoint has {key!r}, but this model has no such fusion parameter")
            targets[key] = getattr(getattr(layers[name], m.group(4)), m.group(5))
        fill_weights("the AdapterHub fusion checkpoint", targets, weights)
        filled = {id(p) for p in targets.values()}
        expected = list(fusion_state_dict(model, name))
        if len(filled) != len(expected):
            raise ValueError(f"the AdapterHub fusion checkpoint lacks {len(expected) - len(filled)} of the layer's "
                             f"{len(expected)} parameters")  # fmt: skip
    except Exception:
        remove_fusion(model, name)
        raise
    return name


def _save_fusion(model: nn.Module, directory: str, name: str) -> None:
    fused, config = fusion_configs(model)[name]
    meta = {"adapter_names": fused, "config": config.to_dict()}  # AdapterHub's AdapterFusionConfig fields
    weights = {_hub_key(k): v.cpu().clone() for k, v in fusion_state_dict(model, name).items()}
    _write(model, directory, name, meta, weights, FUSION_CONFIG_FILE, FUSION_BIN_FILE)


def _hidden(model: nn.Module) -> int:
    model_config = getattr(model, "config", None)
    hidden = getattr(model_config, "hidden_size", None) or getattr(model_config, "dim", None)
    return find_sites(model)[0].hidden_size if hidden is None else hidden


def _write(model: nn.Module, directory: str, name: str, meta: dict, weights: dict, config_file: str, bin_file: str) -> None:
    """An AdapterHub checkpoint directory: ``meta`` with the model's fields AdapterHub writes
    beside it, and the weights; rank 0 writes on a sharded model."""
    model_config = getattr(model, "config", None)
    meta = {
        **meta,
        "hidden_size": _hidden(model),
        "model_class": type(model).__name__,
        "model_name": getattr(model_config, "name_or_path", "") or "",
        "model_type": getattr(model_config, "model_type", None),
        "name": name,
        "version": f"fastadapter.{__version__}",
    }
    with writing_files(model) as writes:
        if writes:
            os.makedirs(directory, exist_ok=True)
            with open(os.path.join(directory, config_file), "w") as f:
                json.dump(meta, f, indent=2)
            torch.save(weights, os.path.join(directory, bin_file))


def _hub_key(pname: str) -> str:
    # DistilBERT's attention and ffn, a decoder's self_attn (GPT-2: attn) and mlp
    pname = re.sub(r"\.(?:attention|self_attn|attn)\.(adapters|adapter_fusion_layer)\.", r".attention_adapters.\1.", pname)
    pname = re.sub(r"\.(?:ffn|mlp)\.(adapters|adapter_fusion_layer)\.", r".output_adapters.\1.", pname)
    pname = re.sub(r"\.down\.(weight|bias)$", r".adapter_down.0.\1", pname)
    return re.sub(r"\.up\.(weight|bias)$", r".adapter_up.\1", pname)


def save_adapterhub(model: nn.Module, directory: str, name: str) -> None:
    """Write adapter ``name`` of ``model`` as a directory AdapterHub's ``load_adapter`` reads;
    for a fusion layer's name (``"a,b"``), one its ``load_adapter_fusion`` reads."""
    if name in fusion_configs(model):
        _save_fusion(model, directory, name)
        return
    configs = adapter_configs(model)
    if name not in configs:
        raise ValueError(f"no adapter named {name!r}; the model has: {', '.join(configs) or 'none'}")
    config = configs[name]
    conf = dict(_BN_DEFAULTS)
    conf.update(_FLAGS[config.placement])
    conf.update(
        non_linearity=_HUB_ACTIVATION[config.activation],
        reduction_factor=_hub_reduction_factor(config, _hidden(model)),
        scaling=config.scaling,
        init_weights="mam_adapter" if config.init == "mam" else config.init,
        leave_out=list(config.leave_out),
    )
    weights = {_hub_key(k): v.cpu().clone() for k, v in adapter_state_dict(model, name).items()}  # gathered under FSDP2
    _write(model, directory, name, {"config": conf}, weights, CONFIG_FILE, BIN_FILE)


def _hub_reduction_factor(config: AdapterConfig, hidden: int):
    """A reduction factor from which AdapterHub's int(hidden // factor) gives our bottleneck sizes."""
    if config.bottleneck_size is None:
        return config.reduction_factor
    size = config.bottleneck_size
    factor = hidden / size
    for candidate in (factor, math.nextafter(factor, 0.0), math.nextafter(factor, math.inf)):
        if int(hidden // candidate) == size:
            return candidate
    raise ValueError(f"bottleneck_size {size} cannot be written as an AdapterHub reduction factor of hidden size {hidden}")
