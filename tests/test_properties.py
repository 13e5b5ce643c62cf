"""Property-based sweep: random shapes and options against float64 math, for every CPU backend."""

import pytest
import torch

pytest.importorskip("hypothesis")  # a test extra; absent on bare GPU machines

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from .helpers import ACTIVATIONS, check_against_float64, make_inputs, require

CPU_BACKENDS = ["reference", "cpp", "triton"]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    n=st.integers(0, 40),
    d=st.integers(1, 70),
    r=st.integers(1, 20),
    activation=st.sampled_from(ACTIVATIONS),
    residual=st.sampled_from(["x", "none", "tensor"]),
    bias=st.booleans(),
    # within fp32's range: a scaling of 1e-95 underflows in any fp32 kernel
    scaling=st.one_of(st.just(0.0), st.floats(0.01, 3.0), st.floats(-3.0, -0.01)),
    seed=st.integers(0, 2**16),
)
def test_random_problems_match_float64(backend, n, d, r, activation, residual, bias, scaling, seed):
    require(backend, "cpu", torch.float32, r)
    x, wd, bd, wu, bu = make_inputs(n, d, r, bias=bias, seed=seed)
    if residual == "x":
        res = True
    elif residual == "none":
        res = False
    else:
        res = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed + 1))
    check_against_float64(backend, x, wd, bd, wu, bu, activation, scaling=scaling, residual=res)
