"""fastadapter: fused bottleneck adapters for fine-tuning BERT-family encoders and decoder LLMs."""

__version__ = "0.1.0"

from .activations import ACTIVATIONS
from .backends import available_backends
from .composition import Average, BatchSplit, Fuse, Parallel, Stack
from .hf import (
    AdapterConfig,
    FusionConfig,
    active_adapter,
    adapter_configs,
    adapter_routing,
    adapter_state_dict,
    add_adapters,
    add_fusion,
    fusion_configs,
    fusion_regularization,
    fusion_state_dict,
    load_adapterhub,
    load_adapters,
    mark_only_adapters_trainable,
    mark_only_fusion_trainable,
    remove_adapter,
    remove_fusion,
    save_adapterhub,
    save_adapters,
    set_active_adapter,
    shard_model,
)
from .modules import AdapterFusion, FusedAdapter
from .ops.adapter import fused_adapter
from .ops.adapter_layernorm import adapter_layernorm
from .ops.adapter_rmsnorm import adapter_rmsnorm
from .ops.mixed_adapter import mixed_adapter, stack_adapters

__all__ = [
    "ACTIVATIONS",
    "AdapterConfig",
    "AdapterFusion",
    "Average",
    "BatchSplit",
    "Fuse",
    "FusedAdapter",
    "FusionConfig",
    "Parallel",
    "Stack",
    "add_fusion",
    "fusion_configs",
    "fusion_regularization",
    "fusion_state_dict",
    "mark_only_fusion_trainable",
    "remove_fusion",
    "__version__",
    "active_adapter",
    "adapter_configs",
    "adapter_layernorm",
    "adapter_rmsnorm",
    "adapter_routing",
    "adapter_state_dict",
    "add_adapters",
    "available_backends",
    "fused_adapter",
    "load_adapterhub",
    "load_adapters",
    "mark_only_adapters_trainable",
    "mixed_adapter",
    "remove_adapter",
    "save_adapterhub",
    "save_adapters",
    "set_active_adapter",
    "shard_model",
    "stack_adapters",
]
