"""``FusedAdapter``: a bottleneck adapter module that runs as one fused op."""

from __future__ import annotations

import math
from typing import Optional, Union

import torch
from torch import Tensor, nn

from . import backends
from .activations import canonical_activation
from .ops.adapter import fused_adapter

INITS = ("bert", "houlsby", "mam")


class FusedAdapter(nn.Module):
    """``y = R + scaling * up(act(down(x)))`` with R = x by default.

    ``down`` and ``up`` are plain ``nn.Linear`` children, so the state dict reads
    ``down.weight``, ``down.bias``, ``up.weight``, ``up.bias`` like an unfused adapter.

    Init schemes: ``"bert"`` N(0, 0.02) weights; ``"houlsby"`` truncated normal with
    std 1e-2; ``"mam"`` kaiming-uniform down-projection and a zero up-projection, so
    the adapter starts as the identity map. Biases start at zero in all three.
    """

    def __init__(
        self,
        hidden_size: int,
        bottleneck_size: int,
        activation: str = "relu",
        bias: bool = True,
        scaling: float = 1.0,
        init: str = "bert",
        backend: Optional[str] = None,
        device=None,
        dtype=None,
    ):
        super().__init__()
        for name, value in (("hidden_size", hidden_size), ("bottleneck_size", bottleneck_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if init not in INITS:
            raise ValueError(f"unknown init {init!r}; expected one of: {', '.join(INITS)}")
        self.down = nn.Linear(hidden_size, bottleneck_size, bias=bias, device=device, dtype=dtype)
        self.up = nn.Linear(bottleneck_size, hidden_size, bias=bias, device=device, dtype=dtype)
        self._configure(activation, scaling, backend)
        self.init = init
        self.reset_parameters()

    def _configure(self, activation: str, scaling: float, backend: Optional[str]) -> None:
        self.activation = canonical_activation(activation)
        if isinstance(scaling, bool) or not isinstance(scaling, (int, float)) or not math.isfinite(scaling):
            raise ValueError(f"scaling must be a finite Python number, got {scaling!r}")
        self.scaling = float(scaling)
        if backend is not None and backend != backends.AUTO:
            backends.get(backend)
        self.backend = backend

    @property
    def hidden_size(self) -> int:
        return self.down.in_features

    @property
    def bottleneck_size(self) -> int:
        return self.down.out_features

    @torch.no_grad()
    def reset_parameters(self) -> None:
        if self.init == "bert":
            nn.init.normal_(self.down.weight, std=0.02)
            nn.init.normal_(self.up.weight, std=0.02)
        elif self.init == "houlsby":
            nn.init.trunc_normal_(self.down.weight, std=1e-2, a=-2e-2, b=2e-2)
            nn.init.trunc_normal_(self.up.weight, std=1e-2, a=-2e-2, b=2e-2)
        else:  # mam
            nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
            nn.init.zeros_(self.up.weight)
        for layer in (self.down, self.up):
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)

    @classmethod
    def from_linear(
        cls,
        down: nn.Linear,
        up: nn.Linear,
        activation: str = "relu",
        scaling: float = 1.0,
        backend: Optional[str] = None,
    ) -> FusedAdapter:
        """Wrap an existing pair of ``nn.Linear`` layers; the weights are shared, not copied."""
        if not isinstance(down, nn.Linear) or not isinstance(up, nn.Linear):
            raise TypeError(f"down and up must be nn.Linear, got {type(down).__name__} and {type(up).__name__}")
        if up.in_features != down.out_features or up.out_features != down.in_features:
            raise ValueError(
                f"down must be Linear(d, r) and up Linear(r, d): got down {down.in_features}->{down.out_features}, "
                f"up {up.in_features}->{up.out_features}"
            )
        if (down.bias is None) != (up.bias is None):
            raise ValueError("down and up must both have a bias or both have none")
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self.down, self.up = down, up
        self.init = "bert"
        self._configure(activation, scaling, backend)
        return self

    def forward(self, x: Tensor, residual: Union[bool, Tensor] = True) -> Tensor:
        return fused_adapter(
            x,
            self.down.weight,
            self.down.bias,
            self.up.weight,
            self.up.bias,
            activation=self.activation,
            scaling=self.scaling,
            residual=residual,
            backend=self.backend,
        )

    def extra_repr(self) -> str:
        parts = [
            f"hidden_size={self.hidden_size}",
            f"bottleneck_size={self.bottleneck_size}",
            f"activation={self.activation!r}",
            f"scaling={self.scaling}",
            f"bias={self.down.bias is not None}",
        ]
        if self.backend is not None:
            parts.append(f"backend={self.backend!r}")
        return ", ".join(parts)


class AdapterFusion(nn.Module):
    """AdapterFusion's parameters (Pfeiffer et al. 2021): the attention over adapters.

    ``query``, ``key`` (``nn.Linear(d, d)``, N(0, 0.02) weights, zero bias) and ``value``
    (``nn.Linear(d, d, bias=False)``, the identity plus 1e-6 when ``value_initialized``, as
    AdapterHub starts it) are children named as AdapterHub names them; a flag set False
    leaves that projection out. ``temperature``: the softmax divides by T, which starts at 50
    and falls by 0.05 every forward to 1, as AdapterHub does; otherwise T = 1.
    ``dropout`` applies to the scores in training. The math is in
    :func:`fastadapter.composition.fuse_adapters`.
    """

    def __init__(self, hidden_size: int, query: bool = True, key: bool = True, value: bool = True,
                 value_initialized: bool = True, temperature: bool = False, dropout: float = 0.0, device=None,
                 dtype=None):  # fmt: skip
        super().__init__()
        if isinstance(hidden_size, bool) or not isinstance(hidden_size, int) or hidden_size < 1:
            raise ValueError(f"hidden_size must be a positive integer, got {hidden_size!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must lie in [0, 1), got {dropout!r}")
        kw = dict(device=device, dtype=dtype)
        self.query = nn.Linear(hidden_size, hidden_size, **kw) if query else None
        self.key = nn.Linear(hidden_size, hidden_size, **kw) if key else None
        self.value = nn.Linear(hidden_size, hidden_size, bias=False, **kw) if value else None
        self.value_initialized = value_initialized
        self.dropout = float(dropout)
        self.temperature = bool(temperature)
        self.T = 50.0 if temperature else 1.0
        self._step = self.T / 1000.0
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        for layer in (self.query, self.key):
            if layer is not None:
                nn.init.normal_(layer.weight, std=0.02)
                nn.init.zeros_(layer.bias)
        if self.value is not None:
            if self.value_initialized:
                self.value.weight.fill_(1e-6)
                self.value.weight.diagonal().fill_(1.0)
            else:
                nn.init.normal_(self.value.weight, std=0.02)

    def probabilities(self, scores: Tensor) -> Tensor:
        """softmax over the last dimension of dropout(scores) / T (then T steps down)."""
        scores = torch.nn.functional.dropout(scores, self.dropout, self.training)
        p = torch.softmax(scores / self.T, dim=-1)
        self.T = max(self.T - self._step, 1.0)
        return p

    def regularization(self) -> Tensor:
        """AdapterFusion's "dynamic" regularization term 0.01 * ||W_v - I||^2 (zero without W_v)."""
        if self.value is None:
            return torch.zeros(())
        w = self.value.weight
        return 0.01 * (w - torch.eye(w.shape[0], device=w.device, dtype=w.dtype)).pow(2).sum()

    def extra_repr(self) -> str:
        return f"dropout={self.dropout}, temperature={self.temperature}"
