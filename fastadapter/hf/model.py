"""Adding, switching and removing named adapters in a Hugging Face BERT-family or decoder model.

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
parallel replaces h by h + s*f(r). Under a pfeiffer composition the FFN's hook keeps h and r
apart for the LayerNorm's hook (AdapterHub's Average scales h alone).

A composition block (:mod:`fastadapter.composition`) runs at each site through
:mod:`fastadapter.hf.compose`.

Decoders (Llama, Mistral, Qwen2, Qwen3, GPT-2) keep their adapters on the attention and MLP
modules (``...self_attn.adapters.<name>``, ``...mlp.adapters.<name>``); their sites are
described in :mod:`fastadapter.hf.decoder`.

Several adapters of one placement may be active at once (``set_active_adapter(model,
[names])``); inside ``adapter_routing(model, ids)`` each site then stacks them and runs
the mixed-adapter op, example b through adapter ``ids[b]``.
"""

from __future__ import annotations

import contextlib
import functools
import re
from typing import Iterator, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .. import composition
from ..composition import Block
from ..modules import FusedAdapter
from ..ops.adapter_layernorm import adapter_layernorm
from ..ops.mixed_adapter import mixed_adapter, stack_adapters
from . import compose
from .config import AdapterConfig
from .distributed import full, is_sharded
from .sites import Site, find_sites

_CONFIGS = "_fastadapter_configs"  # model attribute: {name: AdapterConfig}
_FUSIONS = "_fastadapter_fusions"  # model attribute: {fusion name: (adapter names, FusionConfig)}
_ROUTING = "_fastadapter_routing"  # site owner attribute inside adapter_routing: ids [batch]
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_\-]*$")


# Hooks are module-level functions that find their state through the hooked module, so
# copy.deepcopy and pickle of a model with adapters keep working (closures would tie a
# copy to the original's adapters, and do not pickle).
_OWNER = "_fastadapter_owner"  # plain attribute of a hooked module: the site's owner module
_SPLIT = "_fastadapter_split"  # DistilBERT FFN attribute: (r, h) of this forward, for a pfeiffer composition


def _placements(owner: nn.Module) -> dict:
    return owner.__dict__.setdefault("_fastadapter_placement", {})


class _Routed:
    """Several active adapters at a site: their stacked weights and each row's adapter."""

    def __init__(self, owner: nn.Module, names: tuple[str, ...], like: torch.Tensor):
        ids = owner.__dict__.get(_ROUTING)
        if ids is None:
            raise RuntimeError(f"{len(names)} adapters are active ({', '.join(names)}): run the model inside "
                               "fastadapter.adapter_routing(model, ids), which says which one each example takes")  # fmt: skip
        present = [n for n in names if n in owner.adapters]  # leave_out may skip a layer for some
        first = owner.adapters[present[0]]
        self.activation, self.scaling = first.activation, first.scaling
        self.weights = stack_adapters([owner.adapters[n] for n in present])
        # position in the active list -> row of the stack (-1: this site has no such adapter)
        remap = torch.tensor([present.index(n) if n in present else -1 for n in names] + [-1], device=ids.device)
        if ids.shape[0] != like.shape[0]:
            raise ValueError(f"adapter_routing has ids for {ids.shape[0]} examples, the batch has {like.shape[0]}")
        per_example = remap[ids]  # ids == -1 reads the trailing -1
        self.index = per_example.view(-1, *([1] * (like.dim() - 2))).expand(like.shape[:-1])

    def __call__(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return mixed_adapter(x, self.index, *self.weights, activation=self.activation, scaling=self.scaling,
                             residual=residual)  # fmt: skip


def _names(active) -> tuple:
    if isinstance(active, Block):
        return tuple(active.names())
    return active if isinstance(active, tuple) else (active,)


def _active_names(owner: nn.Module, placement: Optional[str] = None):
    """None, one adapter name, a tuple of names (several active, routed) or a composition
    block, of the given placement."""
    active = owner.__dict__.get("_fastadapter_active")
    if active is None:
        return None
    names = _names(active)
    placements = _placements(owner)
    if not any(n in placements for n in names):
        return None
    if placement is not None and _placement_of(owner, names) != placement:
        return None
    return active


def _placement_of(owner: nn.Module, names) -> str:
    """The placement of the active adapter(s) ``names`` (a name, a tuple or a block) at a site."""
    placements = _placements(owner)
    return placements[names if isinstance(names, str) else next(n for n in _names(names) if n in placements)]


def _active(owner: nn.Module, placement: str) -> Optional[FusedAdapter]:
    name = _active_names(owner, placement)
    if not isinstance(name, str):
        return None
    return owner.adapters[name]


def _houlsby_hook(module, args, output):  # on the module whose output is h
    owner = module.__dict__[_OWNER]
    names = _active_names(owner, "houlsby")
    if isinstance(names, tuple):
        return _Routed(owner, names, output)(output, True)
    if isinstance(names, Block):
        return compose.apply(owner, names, output, None)
    adapter = _active(owner, "houlsby")
    return None if adapter is None else adapter(output)


def _pfeiffer_hook(module, args, output):  # on the LayerNorm applied to t = h + r
    owner = module.__dict__[_OWNER]
    names = _active_names(owner, "pfeiffer")
    if names is None:
        return None
    if isinstance(names, tuple):
        y = _Routed(owner, names, output)(output, args[0])
    elif isinstance(names, Block):  # h and r as the FFN's hook kept them: AdapterHub's Average scales h alone
        split = owner.__dict__.pop(_SPLIT, None)
        if split is None:
            raise RuntimeError(f"{type(module).__name__} ran without its feed-forward module's output: a pfeiffer "
                               "composition in DistilBERT needs the FFN to run before its output LayerNorm")  # fmt: skip
        r, h = split
        y = r + compose.apply(owner, names, h, r, _layer_norm(module))
    else:
        y = owner.adapters[names](output, residual=args[0])
    return F.layer_norm(y, module.normalized_shape, module.weight, module.bias, module.eps)


def _parallel_hook(module, args, output):  # DistilBERT's FFN: h + s * f(r)
    if isinstance(_active_names(module, "pfeiffer"), Block):  # the LayerNorm's hook runs the composition on r, h
        module.__dict__[_SPLIT] = (args[0], output)
        return None
    names = _active_names(module, "parallel")
    if isinstance(names, tuple):
        return _Routed(module, names, output)(args[0], output)
    if isinstance(names, Block):
        return compose.apply(module, names, output, args[0])
    adapter = _active(module, "parallel")
    return None if adapter is None else adapter(args[0], residual=output)


def _bert_site_forward(owner, *args, **kwargs):
    """A BERT-style site module's forward with an adapter: LN(h + r + s*f(.)) as one op, with
    h = dropout(dense(hidden_states)) and r = input_tensor; with several active adapters
    (routed), the mixed-adapter op, the add and the LayerNorm; the module's own forward
    when no adapter is active."""
    names = _active_names(owner)
    if names is None:
        return type(owner).forward(owner, *args, **kwargs)
    arg_names = ("hidden_states", "input_tensor")
    values = dict(zip(arg_names, args))
    values.update({k: v for k, v in kwargs.items() if k in arg_names})
    unknown = set(kwargs) - set(arg_names)
    if len(args) > 2 or unknown or len(values) != 2:
        raise TypeError(f"{type(owner).__name__} with adapters takes (hidden_states, input_tensor), got {len(args)} "
                        f"positional and {sorted(kwargs)} keyword arguments")  # fmt: skip
    h = owner.dropout(owner.dense(values["hidden_states"]))
    ln = owner.LayerNorm
    placement = _placement_of(owner, names)
    r = values["input_tensor"]
    if isinstance(names, tuple):
        routed = _Routed(owner, names, h)
        d = (h.shape[-1],)
        if placement == "pfeiffer":
            t = h + r
            y = routed(F.layer_norm(t, d, ln.weight, ln.bias, ln.eps), t)
        else:
            y = routed(h if placement == "houlsby" else r, h + r)
        return F.layer_norm(y, d, ln.weight, ln.bias, ln.eps)
    h, step = compose.site(owner, names, h, r, _layer_norm(ln) if placement == "pfeiffer" else None)
    if step is None:  # a composition that ends in no single adapter op
        return ln(h + r)
    return adapter_layernorm(
        h, r, step.w_down, step.b_down, step.w_up, step.b_up, ln.weight, ln.bias, placement=placement, eps=ln.eps,
        activation=step.activation, scaling=step.scaling, backend=step.backend,
    )  # fmt: skip


def _layer_norm(ln: nn.LayerNorm):
    """The LayerNorm's math as a function (not its module: no hooks run)."""
    return functools.partial(F.layer_norm, normalized_shape=ln.normalized_shape, weight=ln.weight, bias=ln.bias, eps=ln.eps)


def _install_hooks(site: Site) -> None:
    if site.style in ("decoder", "gpt2"):
        from .decoder import install  # decoder.py reads this module's adapter state

        install(site)
        return
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
    """Add adapters named ``name`` to every layer of a BERT-family or decoder ``model`` and make them active.

    The adapters take the dtype and device of each layer's LayerNorm weight.
    """
    config = AdapterConfig() if config is None else config
    if not isinstance(config, AdapterConfig):
        raise TypeError(f"config must be a fastadapter.AdapterConfig, got {type(config).__name__}")
    if not isinstance(name, str) or not _NAME.match(name):
        raise ValueError(f"adapter name must be an identifier (letters, digits, _ or -), got {name!r}")
    if is_sharded(model):
        raise ValueError("add adapters before sharding the model: FSDP2 manages only the parameters a module has when "
                         "fully_shard is called (add_adapters, or load_adapters, then fastadapter.shard_model)")  # fmt: skip
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


def set_active_adapter(model: nn.Module, name) -> None:
    """Make ``name`` the adapter every layer applies; ``None`` switches all adapters off.

    A list of names activates several adapters of one placement (and one activation and
    scaling) at once: run the model inside :func:`adapter_routing`, which says which of
    them each example of the batch takes. A list of one name is that name.

    A composition block (``fastadapter.Stack``, ``Average``, ``Fuse``, ``BatchSplit``,
    ``Parallel``) of adapters of one placement runs that composition at every site (see
    :mod:`fastadapter.composition`); a ``Fuse`` needs its fusion layer (:func:`add_fusion`)."""
    configs = model.__dict__.get(_CONFIGS, {})
    if isinstance(name, Block):
        _check_block(model, name)
        active = name
    else:
        active = _check_names(configs, name)
    for site in find_sites(model):
        site.owner.__dict__["_fastadapter_active"] = active
    model.__dict__["_fastadapter_active"] = active
    _replicate_for(model, composition.parallel_channels(active) if isinstance(active, Block) else 1)


def _check_names(configs: dict, name):
    names = [name] if name is None or isinstance(name, str) else list(name)
    if not names:
        raise ValueError("set_active_adapter takes a name, a list of names, a composition block or None, got an empty list")
    for n in names:
        if isinstance(n, Block):
            raise TypeError(f"a list of names routes examples to adapters; pass a composition block alone, got {n!r} in a list")
        if n is not None and n not in configs:
            raise ValueError(f"no adapter named {n!r}; the model has: {', '.join(configs) or 'none'}")
    if len(names) > 1:
        if len(set(names)) != len(names):
            raise ValueError(f"set_active_adapter got a name twice: {names}")
        first = configs[names[0]]
        for n in names[1:]:
            for attr in ("placement", "activation", "scaling"):
                if getattr(configs[n], attr) != getattr(first, attr):
                    raise ValueError(f"adapters active together must share their {attr}: {names[0]!r} has "
                                     f"{getattr(first, attr)!r}, {n!r} has {getattr(configs[n], attr)!r}")  # fmt: skip
    return names[0] if len(names) == 1 else tuple(names)


def _check_block(model: nn.Module, block: Block) -> None:
    """Refuse, by name, a composition this model cannot run."""
    configs = model.__dict__.get(_CONFIGS, {})
    composition.validate(block)
    names = block.names()
    for n in names:
        if n not in configs:
            raise ValueError(f"{block!r} names no adapter {n!r}; the model has: {', '.join(configs) or 'none'}")
    placements = {configs[n].placement for n in names}
    if len(placements) > 1:
        raise ValueError(f"a composition holds adapters of one placement; {block!r} mixes "
                         + ", ".join(f"{n}: {configs[n].placement}" for n in names))  # fmt: skip
    placement = placements.pop()
    fusions = model.__dict__.get(_FUSIONS, {})
    for fuse in _blocks(block, composition.Fuse):
        if placement == "parallel":
            raise ValueError(f"{fuse!r}: Fuse takes pfeiffer or houlsby adapters (AdapterHub adds a parallel site's "
                             "input twice under Fuse, and fastadapter does not copy that)")  # fmt: skip
        if fuse.name not in fusions:
            raise ValueError(f"{fuse!r} needs its fusion layer: fastadapter.add_fusion(model, {fuse!r}) first "
                             f"(the model has: {', '.join(fusions) or 'none'})")  # fmt: skip
    for stack in _blocks(block, composition.Stack):
        if placement == "parallel" and len(stack) > 1:
            raise ValueError(f"{stack!r}: parallel adapters all read the site's input, so a Stack of them would be "
                             "their sum; use Average(..., normalize_weights=False) for that")  # fmt: skip


def _blocks(block: Block, kind) -> Iterator[Block]:
    if isinstance(block, kind):
        yield block
    for c in block:
        if isinstance(c, Block):
            yield from _blocks(c, kind)


def _replicate_for(model: nn.Module, copies: int) -> None:
    """Under a Parallel composition the model's forward replicates its batch ``copies`` times."""
    handle = model.__dict__.pop("_fastadapter_replicate", None)
    if handle is not None:
        handle.remove()
    if copies > 1:
        model.__dict__["_fastadapter_copies_wanted"] = (copies, [site.owner for site in find_sites(model)])
        model.__dict__["_fastadapter_replicate"] = model.register_forward_pre_hook(_replicate, with_kwargs=True)


def _replicate(model: nn.Module, args, kwargs):
    """Every tensor argument with the batch's leading size, repeated once per Parallel child."""
    copies, owners = model.__dict__["_fastadapter_copies_wanted"]
    lead = kwargs.get("input_ids", args[0] if args else None)
    lead = kwargs.get("inputs_embeds") if lead is None else lead
    if not isinstance(lead, torch.Tensor):
        raise TypeError("a Parallel composition needs input_ids or inputs_embeds to find the batch")
    if kwargs.get("past_key_values") is not None or kwargs.get("cache") is not None:  # transformers 4 and 5
        raise ValueError("a Parallel composition replicates the batch at the model's input: it does not run with a "
                         "key/value cache passed in (generate); replicate the prompts and use BatchSplit")  # fmt: skip
    batch = lead.shape[0]

    def rep(t):
        if isinstance(t, torch.Tensor) and t.dim() > 0 and t.shape[0] == batch:
            return t.repeat(copies, *([1] * (t.dim() - 1)))
        return t

    for owner in owners:
        owner.__dict__[compose.COPIES] = batch
    return tuple(rep(a) for a in args), {k: rep(v) for k, v in kwargs.items()}


def active_adapter(model: nn.Module):
    """The active adapter's name, a list of names (several active), or None."""
    active = model.__dict__.get("_fastadapter_active")
    return list(active) if isinstance(active, tuple) else active  # a name, a block or None


@contextlib.contextmanager
def adapter_routing(model: nn.Module, ids) -> Iterator[None]:
    """Within the block, example b of each batch takes active adapter ``ids[b]`` (an index
    into the list given to :func:`set_active_adapter`; -1: no adapter), forward and
    backward, every site as one mixed-adapter op. Run the backward inside the block too
    (gradient checkpointing recomputes the forward there)."""
    active = model.__dict__.get("_fastadapter_active")
    count = len(active) if isinstance(active, tuple) else (0 if active is None else 1)
    ids = torch.as_tensor(ids)
    if ids.dtype not in (torch.int64, torch.int32) or ids.dim() != 1:
        raise TypeError(f"ids must be a 1-D integer tensor or list (one per example), got {ids.dtype} of shape {list(ids.shape)}")
    if count < 2:
        raise ValueError("adapter_routing needs several active adapters: set_active_adapter(model, [name, ...])")
    if ids.numel() and (int(ids.min()) < -1 or int(ids.max()) >= count):
        raise ValueError(f"ids must lie in [-1, {count}) (the {count} active adapters: {active_adapter(model)}), "
                         f"got {ids.tolist()}")  # fmt: skip
    device = next(model.parameters()).device
    ids = ids.to(device=device, dtype=torch.int64)
    owners = [site.owner for site in find_sites(model)]
    saved = [o.__dict__.get(_ROUTING) for o in owners]
    for o in owners:
        o.__dict__[_ROUTING] = ids
    try:
        yield
    finally:
        for o, old in zip(owners, saved):
            o.__dict__[_ROUTING] = old


def remove_adapter(model: nn.Module, name: str) -> None:
    """Delete adapter ``name`` from every layer (deactivating it if it was active)."""
    configs = model.__dict__.get(_CONFIGS, {})
    if name not in configs:
        raise ValueError(f"no adapter named {name!r}; the model has: {', '.join(configs) or 'none'}")
    active = active_adapter(model)
    if active == name or (isinstance(active, list) and name in active) or (isinstance(active, Block) and name in active.names()):
        set_active_adapter(model, None)
    from .fusion import fusion_configs, remove_fusion  # fusion.py builds on this module

    for fusion, (names, _) in fusion_configs(model).items():
        if name in names:
            remove_fusion(model, fusion)
    for site in find_sites(model):
        if isinstance(getattr(site.owner, "adapters", None), nn.ModuleDict) and name in site.owner.adapters:
            del site.owner.adapters[name]
            _placements(site.owner).pop(name, None)
    del configs[name]


def mark_only_adapters_trainable(model: nn.Module, train_head: bool = True) -> dict[str, int]:
    """Freeze the base model; adapters and fusion layers (and, if asked, the task head) stay trainable.

    The head is every parameter outside ``model.base_model`` (Hugging Face's split of a
    task model into base model and head). Returns parameter counts.
    """
    counts = mark_trainable(model, (".adapters.", ".adapter_fusion_layer."), train_head)
    counts["adapters"] = sum(p.numel() for n, p in model.named_parameters() if ".adapters." in f".{n}")
    return counts


def mark_trainable(model: nn.Module, parts: tuple[str, ...], train_head: bool) -> dict[str, int]:
    """Only the parameters whose names hold one of ``parts`` (and, if asked, the head: every
    parameter outside ``model.base_model``) train. Returns the trainable and total counts."""
    base = getattr(model, "base_model", model)
    base_ids = {id(p) for p in base.parameters()} if base is not model else None
    trainable = total = 0
    for pname, p in model.named_parameters():
        in_head = base_ids is not None and id(p) not in base_ids
        p.requires_grad_(any(part in f".{pname}" for part in parts) or (train_head and in_head))
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return {"trainable": trainable, "total": total}


def adapter_state_dict(model: nn.Module, name: Optional[str] = None) -> dict[str, torch.Tensor]:
    """The adapters' parameters (all, or those of adapter ``name``) under their model names,
    whole: on a model sharded by FSDP2 they are gathered, so every rank must call it."""
    configs = model.__dict__.get(_CONFIGS, {})
    if name is not None and name not in configs:
        raise ValueError(f"no adapter named {name!r}; the model has: {', '.join(configs) or 'none'}")
    names = [name] if name is not None else list(configs)
    out = {}
    for pname, p in model.named_parameters():
        m = re.search(r"(?:^|\.)adapters\.([^.]+)\.", pname)
        if m and m.group(1) in names:
            out[pname] = full(p.detach())
    return out
