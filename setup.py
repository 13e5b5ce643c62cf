"""Packaging metadata lives in pyproject.toml. This file adds the optional ahead-of-time
build of the C++/CUDA extension:

    FASTADAPTER_BUILD_EXT=1 pip install --no-build-isolation .

(--no-build-isolation: the build must use the torch it will run with). Without it the
extension is compiled on first use and cached (fastadapter/backends/extension.py).
"""

import os
import sys

from setuptools import setup

ext_modules, cmdclass = [], {}
if os.environ.get("FASTADAPTER_BUILD_EXT", "0") == "1":
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    cuda = torch.version.cuda is not None and CUDA_HOME is not None
    # at::parallel_for in an extension compiled without -fopenmp runs on one thread
    openmp = ["-fopenmp"] if sys.platform.startswith("linux") and "OpenMP" in torch.__config__.parallel_info() else []
    sources = [
        "csrc/binding.cpp",
        "csrc/adapter_cpu.cpp",
        "csrc/adapter_layernorm_cpu.cpp",
        "csrc/adapter_rmsnorm_cpu.cpp",
        "csrc/cpu_activation.cpp",
        "csrc/cpu_residual_gemm.cpp",
        "csrc/cpu_weight_grad.cpp",
        "csrc/mixed_adapter_cpu.cpp",
    ]
    defines = []
    if cuda:
        sources += ["csrc/adapter_cuda.cu", "csrc/adapter_cuda_binding.cpp"]
        defines = ["-DFASTADAPTER_WITH_CUDA"]
    extension = CUDAExtension if cuda else CppExtension
    csrc = os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc")
    ext_modules = [
        extension(
            "fastadapter._C",
            sources,
            include_dirs=[csrc],
            extra_compile_args={"cxx": ["-O3", *openmp, *defines], "nvcc": ["-O3", *defines]},
            extra_link_args=openmp,
        )
    ]
    cmdclass = {"build_ext": BuildExtension}

setup(ext_modules=ext_modules, cmdclass=cmdclass)
