"""Hugging Face integration: adapters in BERT-family encoders and decoder LLMs."""

from .adapterhub import load_adapterhub, save_adapterhub
from .checkpoint import load_adapters, save_adapters
from .config import AdapterConfig, FusionConfig
from .distributed import shard_model
from .fusion import (
    add_fusion,
    fusion_configs,
    fusion_regularization,
    fusion_state_dict,
    mark_only_fusion_trainable,
    remove_fusion,
)
from .model import (
    active_adapter,
    adapter_configs,
    adapter_routing,
    adapter_state_dict,
    add_adapters,
    mark_only_adapters_trainable,
    remove_adapter,
    set_active_adapter,
)

__all__ = [
    "AdapterConfig",
    "FusionConfig",
    "add_fusion",
    "fusion_configs",
    "fusion_regularization",
    "fusion_state_dict",
    "mark_only_fusion_trainable",
    "remove_fusion",
    "active_adapter",
    "adapter_configs",
    "adapter_routing",
    "adapter_state_dict",
    "add_adapters",
    "load_adapterhub",
    "load_adapters",
    "mark_only_adapters_trainable",
    "remove_adapter",
    "save_adapterhub",
    "save_adapters",
    "set_active_adapter",
    "shard_model",
]
