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


@pytest.fixture(params=["avx512", "avx2", "no-avx2"])
def cpp_avx2(request):
    """Runs a cpp test on each way this CPU has through the row-pointer kernels of csrc/ (the
    mixed op's row maps, the site ops' fused epilogues): their products at the AVX-512 width
    (AVX-512 and AVX2 on), in the AVX2 kernel (AVX-512 off), and their ATen and gather
    compositions (AVX2 off)."""
    from fastadapter.backends import extension

    from .helpers import require

    require("cpp", "cpu")
    module = extension.load()[0]
    if request.param == "avx512" and not (all(module.avx512_kernels()) and all(module.avx2_kernels())):
        pytest.skip("this CPU has no AVX-512")
    if request.param == "avx2" and not all(module.avx2_kernels()):
        pytest.skip("this CPU has no AVX2 and FMA")
    previous = (module.set_avx512_kernels_enabled(request.param == "avx512" and module.avx512_kernels()[0]),
                module.set_avx2_kernels_enabled(request.param != "no-avx2"))  # fmt: skip
    try:
        yield request.param
    finally:
        module.set_avx512_kernels_enabled(previous[0])
        module.set_avx2_kernels_enabled(previous[1])
