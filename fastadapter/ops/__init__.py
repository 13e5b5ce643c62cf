from .adapter import adapter_backward, adapter_forward, check_inputs, fused_adapter

__all__ = ["adapter_backward", "adapter_forward", "check_inputs", "fused_adapter"]
