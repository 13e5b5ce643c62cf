"""fastadapter: fused bottleneck adapters for BERT-family fine-tuning."""

from .activations import ACTIVATIONS
from .backends import available_backends
from .modules import FusedAdapter
from .ops.adapter import fused_adapter

__version__ = "0.1.0"

__all__ = ["ACTIVATIONS", "FusedAdapter", "available_backends", "fused_adapter", "__version__"]
