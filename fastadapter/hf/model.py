"""Adding, switching and removing named adapters in a Hugging Face BERT-family model.

Adapters are ``FusedAdapter`` modules in an ``adapters`` ModuleDict on each site's
owner module (``...attention.output.adapters.<name>`` and ``...output.adapters.<name>``
for BERT), so parameter names read ``adapters.<name>.down.weight``. Forward hooks on the
model's own modules apply the active adapter; with no active adapter the hooks change
nothing and the model computes exactly what it did before. The math per placement, with
h the sub-layer output (after dense and dropout), r the sub-layer input, LN the layer's
own LayerNorm and f the adapter without residual (as AdapterHub computes it):

    pfeiffer (feed-forward only):       LN(h + r + s * f(LN(h + r)))
    houlsby  (attention, feed-forward): LN(h + r + s * f(h))
    parallel (feed-forward only):       LN(h + r + s * f(r))

In BERT, RoBERTa, XLM-RoBERTa and ELECTRA, where one module (``attention.output`` or
``output``) holds the sub-layer's dense, dropout and LayerNorm, each site runs as one op,
:func:`fastadapter.adapter_layernorm` (the adapter, the residual and the LayerNorm): the
site module's ``forward`` is replaced, on that instance only, by ``_bert_site_forward``,
which runs the module's own forward whenever no adapter of its placement is active. In
DistilBERT, whose LayerNorms sit in the transformer block, the adapter op runs from hooks:
houlsby replaces h by h + s*f(h); pfeiffer re-normalizes t + s*f(LN(t)) with t = h + r;
parallel replaces h by h + s*f(r).
"""

from __future__ import annotations

import functools
import re
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..modules import FusedAdapter
from ..ops.adapter_layernorm import adapter_layernorm
from .config import AdapterConfig
from .sites import Site, find_sites

_CONFIGS = "_fastadapter_configs"  # model attribute: {name: AdapterConfig}
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_\-]*$")


# Hooks are module-level functions that find their state through the hooked module, so
# copy.deepcopy and pickle of a model with adapters keep working (closures would tie a
# copy to the original's adapters, and do not pickle).
_OWNER = "_fastadapter_owner"  # plain attribute of a hooked module: the site's owner module


def _placements(owner: nn.Module) -> dict:
    return owner.__dict__.setdefault("_fastadapter_placement", {})


def _active(owner: nn.Module, placement: str) -> Optional[FusedAdapter]:
    name = owner.__dict__.get("_fastadapter_active")
    if name is None or _placements(owner).get(name) != placement:
        return None
    return owner.adapters[name]


def _houlsby_hook(module, args, output):  # on the module whose output is h
    adapter = _active(module.__dict__[_OWNER], "houlsby")
    return None if adapter is None else adapter(output)


def _pfeiffer_hook(module, args, output):  # on the LayerNorm applied to t = h + r
    adapter = _active(module.__dict__[_OWNER], "pfeiffer")
    if adapter is None:
        return None
    return F.layer_norm(adapter(output, residual=args[0]), module.normalized_shape, module.weight, module.bias, module.eps)


def _parallel_hook(module, args, output):  # DistilBERT's FFN: h + s * f(r)
    adapter = _active(module, "parallel")
    return None if adapter is None else adapter(args[0], residual=output)


def _active_site(owner: nn.Module) -> tuple[Optional[FusedAdapter], Optional[str]]:
    name = owner.__dict__.get("_fastadapter_active")
    if name is None or name not in _placements(owner):
        return None, None
    return owner.adapters[name], _placements(owner)[name]


def _bert_site_forward(owner, *args, **kwargs):
    """A BERT-style site module's forward with an adapter: LN(h + r + s*f(.)) as one op, with
    h = dropout(dense(hidden_states)) and r = input_tensor; the module's own forward otherwise."""
    adapter, placement = _active_site(owner)
    if adapter is None:
        return type(owner).forward(owner, *args, **kwargs)
    names = ("hidden_states", "input_tensor")
    values = dict(zip(names, args))
    values.update({k: v for k, v in kwargs.items() if k in names})
    unknown = set(kwargs) - set(names)
    if len(args) > 2 or unknown or len(values) != 2:
        raise TypeError(f"{type(owner).__name__} with adapters takes (hidden_states, input_tensor), got {len(args)} "
                        f"positional and {sorted(kwargs)} keyword arguments")  # fmt: skip
    h = owner.dropout(owner.dense(values["hidden_states"]))
    ln = owner.LayerNorm
    return adapter_layernorm(
        h, values["input_tensor"], adapter.down.weight, adapter.down.bias, adapter.up.weight, adapter.up.bias, ln.weight,
        ln.bias, placement=placement, eps=ln.eps, activation=adapter.activation, scaling=adapter.scaling,
        backend=adapter.backend,
    )  # fmt: skip


def _install_hooks(site: Site) -> None:
    if site.owner.__dict__.get("_fastadapter_hooked"):
        return
    if site.style == "bert":  # the whole site as one op: the instance's forward, not a hook
        site.owner.forward = functools.partial(_bert_site_forward, site.owner)
        site.owner.__dict__["_fastadapter_hooked"] = True
        return
    site.h_module.__dict__[_OWNER] = site.owner
    site.h_module.register_forward_hook(_houlsby_hook)
    if site.kind == "output":
        site.layer_norm.__dict__[_OWNER] = site.owner
        site.layer_norm.register_forward_hook(_pfeiffer_hook)
        site.owner.register_forward_hook(_parallel_hook)
    site.owner.__dict__["_fastadapter_hooked"] = True


def _sites_for(config: AdapterConfig, sites: list[Site]) -> list[Site]:
    kinds = ("attention", "output") if config.placement == "houlsby" else ("output",)
    return [s for s in sites if s.kind in kinds and s.layer not in config.leave_out]


def adapter_configs(model: nn.Module) -> dict[str, AdapterConfig]:
    """The adapters added to ``model``, by name."""
    return dict(model.__dict__.get(_CONFIGS, {}))


def add_adapters(model: nn.Module, config: Optional[AdapterConfig] = None, name: str = "default") -> nn.Module:
    """Add adapters named ``name`` to every layer of a BERT-family ``model`` and make them active.

    The adapters take the dtype and device of each layer's LayerNorm weight.
    """
    config = AdapterConfig() if config is None else config
    if not isinstance(config, AdapterConfig):
        raise TypeError(f"config must be a fastadapter.AdapterConfig, got {type(config).__name__}")
    if not isinstance(name, str) or not _NAME.match(name):
        raise ValueError(f"adapter name must be an identifier (letters, digits, _ or -), got {name!r}")
    configs = model.__dict__.setdefault(_CONFIGS, {})
    if name in configs:
        raise ValueError(f"the model already has an adapter named {name!r}; remove_adapter() it first")
    sites = find_sites(model)
    n_layers = max(s.layer for s in sites) + 1
    bad = [i for i in config.leave_out if not 0 <= i < n_layers]
    if bad:
        raise ValueError(f"leave_out names layers {bad}, but the model has layers 0..{n_layers - 1}")
    chosen = _sites_for(config, sites)
    built = []
    for site in chosen:  # build everything first: a bad config leaves the model untouched
        ln = site.layer_norm.weight
        adapter = FusedAdapter(
            site.hidden_size,
            config.bottleneck_for(site.layer, site.hidden_size),
            activation=config.activation,
            scaling=config.scaling,
            init=config.init,
            backend=config.backend,
            device=ln.device,
            dtype=ln.dtype,
        )
        built.append((site, adapter))
    for site, adapter in built:
        if not isinstance(getattr(site.owner, "adapters", None), nn.ModuleDict):
            site.owner.adapters = nn.ModuleDict()
        site.owner.adapters[name] = adapter
        _placements(site.owner)[name] = config.placement
        _install_hooks(site)  # sites without an adapter need no hooks
    configs[name] = config
    set_active_adapter(model, name)
    return model


def set_active_adapter(model: nn.Module, name: Optional[str]) -> None:
    """Make ``name`` the adapter every layer applies; ``None`` switches all adapters off."""
    configs = model.__dict__.get(_CONFIGS, {})
    if name is not None and name not in configs:
        raise ValueError(f"no adapter named {name!r}; the model has: {', '.join(configs) or 'none'}")
    for site in find_sites(model):
        site.owner.__dict__["_fastadapter_active"] = name
    model.__dict__["_fastadapter_active"] = name


def active_adapter(model: nn.Module) -> Optional[str]:
    return model.__dict__.get("_fastadapter_active")


def remove_adapter(model: nn.Module, name: str) -> None:
    """Delete adapter ``name`` from every layer (deactivating it if it was active)."""
    configs = model.__dict__.get(_CONFIGS, {})
    if name not in configs:
        raise ValueError(f"no adapter named {name!r}; the model has: {', '.join(configs) or 'none'}")
    if active_adapter(model) == name:
        set_active_adapter(model, None)
    for site in find_sites(model):
        if isinstance(getattr(site.owner, "adapters", None), nn.ModuleDict) and name in site.owner.adapters:
            del site.owner.adapters[name]
            _placements(site.owner).pop(name, None)
    del configs[name]


def mark_only_adapters_trainable(model: nn.Module, train_head: bool = True) -> dict[str, int]:
    """Freeze the base model; adapters (and, if asked, the task head) stay trainable.

    The head is every parameter outside ``model.base_model`` (Hugging Face's split of a
    task model into base model and head). Returns parameter counts.
    """
    base = getattr(model, "base_model", model)
    base_ids = {id(p) for p in base.parameters()} if base is not model else None
    trainable = 0
    total = 0
    for pname, p in model.named_parameters():
        in_adapter = ".adapters." in f".{pname}"
        in_head = base_ids is not None and id(p) not in base_ids
        p.requires_grad_(in_adapter or (train_head and in_head))
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    adapters = sum(p.numel() for n, p in model.named_parameters() if ".adapters." in f".{n}")
    return {"trainable": trainable, "adapters": adapters, "total": total}


def adapter_state_dict(model: nn.Module, name: Optional[str] = None) -> dict[str, torch.Tensor]:
    """The adapters' parameters (all, or those of adapter ``name``) under their model names."""
    configs = model.__dict__.get(_CONFIGS, {})
    if name is not None and name not in configs:
        raise ValueError(f"no adapter named {name!r}; the model has: {', '.join(configs) or 'none'}")
    names = [name] if name is not None else list(configs)
    out = {}
    for pname, p in model.named_parameters():
        m = re.search(r"(?:^|\.)adapters\.([^.]+)\.", pname)
        if m and m.group(1) in names:
            out[pname] = p.detach()
    return out
