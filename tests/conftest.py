import os

import pytest
import torch

# Without a GPU the Triton kernels are tested through the Triton interpreter; this
# must be set before triton compiles (imports) any kernel.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(params=["avx2", "no-avx2"])
def cpp_avx2(request):
    """Runs a cpp test twice: with the AVX2 kernels of csrc/ on (the mixed op's row maps,
    the site op's fused epilogue), and off (their ATen and gather compositions)."""
    from fastadapter.backends import extension

    from .helpers import require

    require("cpp", "cpu")
    module = extension.load()[0]
    if request.param == "avx2" and not all(module.avx2_kernels()):
        pytest.skip("this CPU has no AVX2 and FMA")
    previous = module.set_avx2_kernels_enabled(request.param == "avx2")
    try:
        yield request.param
    finally:
        module.set_avx2_kernels_enabled(previous)
