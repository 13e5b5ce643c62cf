import os

import torch

# Triton runs on CPU tensors only through its interpreter, far too slow to time; the
# benchmarks never set TRITON_INTERPRET, so CPU runs time eager, compile and the CPU backends.
if not torch.cuda.is_available():
    os.environ.pop("TRITON_INTERPRET", None)
