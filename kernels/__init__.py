"""Triton kernels of fastadapter, installed as ``fastadapter.kernels``.

Only ``@triton.jit`` code and its launch helpers live here: no dispatch, no autograd.
Importing this package requires triton.
"""
