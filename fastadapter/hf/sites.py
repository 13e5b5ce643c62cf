"""Where adapters attach in a BERT-family encoder or a decoder LLM, found by module structure.

A site is one sub-layer (attention or feed-forward) of one transformer layer: the
module whose output is the sub-layer output h (before the residual add), the norm that
the site's output goes through, and the module that owns the site's ``adapters`` ModuleDict.

BERT, RoBERTa, XLM-RoBERTa and ELECTRA layers have ``attention.output`` and ``output``,
each with ``dense``, ``dropout`` and ``LayerNorm`` and called as (hidden_states,
input_tensor). DistilBERT's TransformerBlock has ``attention.out_lin``,
``sa_layer_norm``, ``ffn`` and ``output_layer_norm``.

Decoders are pre-norm: a Llama, Mistral, Qwen2 or Qwen3 layer has ``self_attn``, ``mlp``,
``input_layernorm`` and ``post_attention_layernorm`` (RMSNorms); the attention site's norm is
the layer's ``post_attention_layernorm``, the feed-forward site's the next layer's
``input_layernorm`` (the model's final ``norm`` after the last layer). A GPT-2 block has
``ln_1``, ``attn``, ``ln_2`` and ``mlp`` (LayerNorms, which stay the model's own).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

LOOKED_FOR = (
    "modules with .attention.output and .output, each holding dense (Linear), dropout and LayerNorm "
    "(BERT, RoBERTa, XLM-RoBERTa, ELECTRA), or with .attention.out_lin, .sa_layer_norm, .ffn and "
    ".output_layer_norm (DistilBERT), or decoder layers with .self_attn, .mlp, .input_layernorm and "
    ".post_attention_layernorm (Llama, Mistral, Qwen2, Qwen3) or .ln_1, .attn, .ln_2 and .mlp (GPT-2)"
)


# decoder model types whose layers are the Llama layer (the norm after each site an RMSNorm
# in Llama's convention), and GPT-2
LLAMA_LIKE = ("llama", "mistral", "qwen2", "qwen3")
DECODERS = LLAMA_LIKE + ("gpt2",)


@dataclass(eq=False)
class Site:
    layer: int
    kind: str  # "attention" or "output" (the feed-forward block)
    owner: nn.Module  # holds the `adapters` ModuleDict
    h_module: nn.Module  # its output is the sub-layer output h
    layer_norm: nn.Module  # bert: applied to h + r; decoder: the norm after the site (see the module doc)
    # "bert": owner is called as (hidden_states, input_tensor); "distilbert": owner is the FFN;
    # "decoder": a Llama-family layer (block); "gpt2": a GPT-2 block (block)
    style: str
    block: nn.Module = None  # decoders: the transformer layer

    @property
    def hidden_size(self) -> int:
        return int(self.layer_norm.weight.shape[0])


def _bert_output(m) -> bool:
    return (
        isinstance(getattr(m, "dense", None), nn.Linear)
        and isinstance(getattr(m, "LayerNorm", None), nn.LayerNorm)
        and isinstance(getattr(m, "dropout", None), nn.Dropout)
    )


def _bert_layer(m) -> bool:
    attention = getattr(m, "attention", None)
    return attention is not None and _bert_output(getattr(attention, "output", None)) and _bert_output(getattr(m, "output", None))


def _distil_layer(m) -> bool:
    return (
        isinstance(getattr(getattr(m, "attention", None), "out_lin", None), nn.Linear)
        and isinstance(getattr(m, "sa_layer_norm", None), nn.LayerNorm)
        and isinstance(getattr(m, "output_layer_norm", None), nn.LayerNorm)
        and isinstance(getattr(m, "ffn", None), nn.Module)
    )


def _llama_layer(m) -> bool:
    parts = ("self_attn", "mlp", "input_layernorm", "post_attention_layernorm")
    return all(isinstance(getattr(m, a, None), nn.Module) for a in parts)


def _gpt2_block(m) -> bool:
    return (
        isinstance(getattr(m, "ln_1", None), nn.LayerNorm)
        and isinstance(getattr(m, "ln_2", None), nn.LayerNorm)
        and isinstance(getattr(m, "attn", None), nn.Module)
        and isinstance(getattr(m, "mlp", None), nn.Module)
    )


def model_type(model: nn.Module):
    return getattr(getattr(model, "config", None), "model_type", None)


def _decoder_sites(model: nn.Module) -> list[Site]:
    kind = model_type(model)
    llama = [m for _, m in model.named_modules() if _llama_layer(m)]
    gpt2 = [m for _, m in model.named_modules() if _gpt2_block(m)]
    if not llama and not gpt2:
        return []
    if kind not in DECODERS:
        raise ValueError(f"decoder model_type {kind!r} is not supported: fastadapter puts adapters into "
                         f"{', '.join(DECODERS)} models (found {'Llama-style' if llama else 'GPT-2-style'} layers)")  # fmt: skip
    if kind == "gpt2":
        return [s for i, b in enumerate(gpt2) for s in (Site(i, "attention", b.attn, b.attn, b.ln_2, "gpt2", b),
                                                          Site(i, "output", b.mlp, b.mlp, b.ln_2, "gpt2", b))]  # fmt: skip
    finals = [m.norm for _, m in model.named_modules() if isinstance(getattr(m, "layers", None), nn.ModuleList)
              and any(x is llama[-1] for x in m.layers) and isinstance(getattr(m, "norm", None), nn.Module)]  # fmt: skip
    if len(finals) != 1:
        raise ValueError(f"found no final norm after the last layer of {type(model).__name__} (a .norm beside .layers)")
    sites = []
    for i, b in enumerate(llama):
        after = llama[i + 1].input_layernorm if i + 1 < len(llama) else finals[0]
        for norm in (b.post_attention_layernorm, after):
            if type(norm).__name__ not in RMS_NORMS:
                raise ValueError(f"{type(norm).__name__} is not an RMSNorm fastadapter knows (its math must be Llama's: "
                                 f"{', '.join(RMS_NORMS)})")  # fmt: skip
        sites.append(Site(i, "attention", b.self_attn, b.self_attn, b.post_attention_layernorm, "decoder", b))
        sites.append(Site(i, "output", b.mlp, b.mlp, after, "decoder", b))
    return sites


# RMSNorm modules computing Llama's w * (y * rsqrt(mean(y^2) + eps)).to(dtype)
RMS_NORMS = ("LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm")


def find_sites(model: nn.Module) -> list[Site]:
    """Every adapter site of the model, layer by layer; ValueError when there is none, or
    when the model is a decoder of a family fastadapter does not support."""
    sites: list[Site] = _decoder_sites(model)
    if sites:
        return sites
    layer = 0
    for _, m in model.named_modules():
        if _bert_layer(m):
            att, out = m.attention.output, m.output
            sites.append(Site(layer, "attention", att, att.dropout, att.LayerNorm, "bert"))
            sites.append(Site(layer, "output", out, out.dropout, out.LayerNorm, "bert"))
            layer += 1
        elif _distil_layer(m):
            att = m.attention
            sites.append(Site(layer, "attention", att, att.out_lin, m.sa_layer_norm, "distilbert"))
            sites.append(Site(layer, "output", m.ffn, m.ffn, m.output_layer_norm, "distilbert"))
            layer += 1
    if not sites:
        raise ValueError(f"found no transformer layers fastadapter knows in {type(model).__name__}: looked for {LOOKED_FOR}")
    return sites


def layers(model: nn.Module) -> list[nn.Module]:
    """The model's transformer layers (Llama-family layers, GPT-2 blocks, BERT-family and
    DistilBERT layers), in order."""
    found = [m for _, m in model.named_modules() if _llama_layer(m) or _gpt2_block(m) or _bert_layer(m) or _distil_layer(m)]
    # a matched layer never nests another (a BERT layer's parts are not layers)
    return [m for m in found if not any(m is not o and any(m is s for s in o.modules()) for o in found)]
