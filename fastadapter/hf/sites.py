"""Where adapters attach in a BERT-family encoder, found by module structure.

A site is one sub-layer (attention or feed-forward) of one transformer layer: the
module whose output is the sub-layer output h (before the residual add), the LayerNorm
applied to h + r, and the module that owns the site's ``adapters`` ModuleDict.

BERT, RoBERTa, XLM-RoBERTa and ELECTRA layers have ``attention.output`` and ``output``,
each with ``dense``, ``dropout`` and ``LayerNorm`` and called as (hidden_states,
input_tensor). DistilBERT's TransformerBlock has ``attention.out_lin``,
``sa_layer_norm``, ``ffn`` and ``output_layer_norm``.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

LOOKED_FOR = (
    "modules with .attention.output and .output, each holding dense (Linear), dropout and LayerNorm "
    "(BERT, RoBERTa, XLM-RoBERTa, ELECTRA), or with .attention.out_lin, .sa_layer_norm, .ffn and "
    ".output_layer_norm (DistilBERT)"
)


@dataclass(eq=False)
class Site:
    layer: int
    kind: str  # "attention" or "output" (the feed-forward block)
    owner: nn.Module  # holds the `adapters` ModuleDict
    h_module: nn.Module  # its output is the sub-layer output h
    layer_norm: nn.LayerNorm  # applied to h + r
    style: str  # "bert": owner is called as (hidden_states, input_tensor); "distilbert": owner is the FFN

    @property
    def hidden_size(self) -> int:
        return int(self.layer_norm.normalized_shape[0])


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


def find_sites(model: nn.Module) -> list[Site]:
    """Every adapter site of the model, layer by layer; ValueError when there is none."""
    sites: list[Site] = []
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
        raise ValueError(f"found no BERT-family transformer layers in {type(model).__name__}: looked for {LOOKED_FOR}")
    return sites
