"""``AdapterConfig``: where adapters go in a transformer layer, and their shape."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Union

from ..activations import canonical_activation
from ..modules import INITS

PLACEMENTS = ("pfeiffer", "houlsby", "parallel")
PLACEMENT_ALIASES = {"seq_bn": "pfeiffer", "double_seq_bn": "houlsby", "par_bn": "parallel"}

# AdapterHub's defaults per placement (SeqBnConfig, DoubleSeqBnConfig, ParBnConfig)
DEFAULTS = {
    "pfeiffer": dict(activation="relu", reduction_factor=16, scaling=1.0, init="bert"),
    "houlsby": dict(activation="silu", reduction_factor=16, scaling=1.0, init="bert"),
    "parallel": dict(activation="relu", reduction_factor=2, scaling=4.0, init="mam"),
}


@dataclass
class AdapterConfig:
    """Adapters for a BERT-family model.

    placement: ``"pfeiffer"``/``"seq_bn"`` (after the feed-forward block),
        ``"houlsby"``/``"double_seq_bn"`` (after attention and after the feed-forward
        block), ``"parallel"``/``"par_bn"`` (beside the feed-forward block).
    reduction_factor: bottleneck = hidden // factor; a number, or a mapping of layer
        index (int or str) to factor with an optional ``"default"``.
    bottleneck_size: a fixed bottleneck instead of a reduction factor.
    activation, scaling, init: per-placement defaults as in AdapterHub when None.
    leave_out: layer indices that get no adapter.
    backend: fastadapter backend for the adapters (None: automatic).
    """

    placement: str = "pfeiffer"
    reduction_factor: Optional[Union[float, Mapping[Union[int, str], float]]] = None
    bottleneck_size: Optional[int] = None
    activation: Optional[str] = None
    scaling: Optional[float] = None
    init: Optional[str] = None
    leave_out: tuple = field(default_factory=tuple)
    backend: Optional[str] = None

    def __post_init__(self):
        if not isinstance(self.placement, str):
            raise TypeError(f"placement must be a string, got {type(self.placement).__name__}")
        placement = PLACEMENT_ALIASES.get(self.placement, self.placement)
        if placement not in PLACEMENTS:
            names = ", ".join(PLACEMENTS + tuple(PLACEMENT_ALIASES))
            raise ValueError(f"unknown placement {self.placement!r}; expected one of: {names}")
        self.placement = placement
        defaults = DEFAULTS[placement]
        if self.bottleneck_size is not None and self.reduction_factor is not None:
            raise ValueError("give reduction_factor or bottleneck_size, not both")
        if self.bottleneck_size is not None:
            if isinstance(self.bottleneck_size, bool) or not isinstance(self.bottleneck_size, int) or self.bottleneck_size < 1:
                raise ValueError(f"bottleneck_size must be a positive integer, got {self.bottleneck_size!r}")
        elif self.reduction_factor is None:
            self.reduction_factor = defaults["reduction_factor"]
        if isinstance(self.reduction_factor, Mapping):
            self.reduction_factor = {str(k): _factor(v) for k, v in self.reduction_factor.items()}
        elif self.reduction_factor is not None:
            self.reduction_factor = _factor(self.reduction_factor)
        self.activation = canonical_activation(self.activation or defaults["activation"])
        self.scaling = defaults["scaling"] if self.scaling is None else self.scaling
        if isinstance(self.scaling, bool) or not isinstance(self.scaling, (int, float)) or not math.isfinite(self.scaling):
            raise ValueError(f"scaling must be a finite number, got {self.scaling!r}")
        self.scaling = float(self.scaling)
        self.init = self.init or defaults["init"]
        if self.init not in INITS:
            raise ValueError(f"unknown init {self.init!r}; expected one of: {', '.join(INITS)}")
        try:
            self.leave_out = tuple(sorted({int(i) for i in self.leave_out}))
        except (TypeError, ValueError):
            raise ValueError(f"leave_out must be layer indices, got {self.leave_out!r}") from None

    def bottleneck_for(self, layer: int, hidden_size: int) -> int:
        """The bottleneck size of the adapter in ``layer`` for a model of ``hidden_size``."""
        if self.bottleneck_size is not None:
            return self.bottleneck_size
        factor = self.reduction_factor
        if isinstance(factor, dict):
            if str(layer) in factor:
                factor = factor[str(layer)]
            elif "default" in factor:
                factor = factor["default"]
            else:
                raise ValueError(f"reduction_factor has no entry for layer {layer} and no 'default'")
        return max(1, int(hidden_size // factor))  # as AdapterHub: never below 1

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["leave_out"] = list(self.leave_out)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> AdapterConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown AdapterConfig fields: {', '.join(sorted(unknown))}")
        return cls(**dict(data))


def _factor(value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"reduction_factor must be a positive number, got {value!r}")
    return value


# AdapterHub's two named fusion configs (StaticAdapterFusionConfig, DynamicAdapterFusionConfig).
FUSION_PRESETS = {
    "dynamic": dict(key=True, query=True, value=True, value_initialized=True, regularization=True, temperature=False),
    "static": dict(key=True, query=True, value=False, value_initialized=False, regularization=False, temperature=False),
}


@dataclass
class FusionConfig:
    """An AdapterFusion layer, as AdapterHub's AdapterFusionConfig says it (``"dynamic"``, its
    default, or ``"static"``, or the fields). ``dropout_prob`` None takes the model's
    ``attention_probs_dropout_prob`` (0 where it has none). ``value_before_softmax`` changes
    nothing (W_v is linear and has no bias). AdapterHub's ``query_before_ln`` and
    ``residual_before`` exist only in their off setting here."""

    key: bool = True
    query: bool = True
    value: bool = True
    value_initialized: bool = True
    regularization: bool = True
    temperature: bool = False
    value_before_softmax: bool = True
    dropout_prob: Optional[float] = None
    query_before_ln: bool = False
    residual_before: bool = False

    def __post_init__(self):
        for name in ("query_before_ln", "residual_before"):
            if getattr(self, name):
                raise ValueError(f"AdapterFusion with {name}=True is not supported; fastadapter fuses with it off")
        if self.dropout_prob is not None and not 0.0 <= float(self.dropout_prob) < 1.0:
            raise ValueError(f"dropout_prob must lie in [0, 1), got {self.dropout_prob!r}")
        self.value_initialized = bool(self.value_initialized)

    @classmethod
    def load(cls, config: Union[str, Mapping[str, Any], FusionConfig, None]) -> FusionConfig:
        if config is None:
            config = "dynamic"
        if isinstance(config, FusionConfig):
            return config
        if isinstance(config, str):
            if config not in FUSION_PRESETS:
                raise ValueError(f"unknown fusion config {config!r}; expected one of: {', '.join(FUSION_PRESETS)}")
            return cls(**FUSION_PRESETS[config])
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(config) - known
        if unknown:
            raise ValueError(f"unknown FusionConfig fields: {', '.join(sorted(unknown))}")
        return cls(**dict(config))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
