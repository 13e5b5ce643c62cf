"""Small Triton kernels that tests/test_gpu_compile.py expects the GPU compile check to
fail, one per kind of failure: a compile error the interpreter does not see (a
non-constexpr module global, as the gelu constants once were), a register spill, a bf16
product that never reaches the tensor cores, and a bf16 kernel with two products of which
one is upcast to IEEE fp32 (its SASS still has tensor-core instructions, from the other)."""

import torch
import triton
import triton.language as tl

SCALE = 0.5  # a plain module global: the interpreter reads it, the GPU compiler refuses it


@triton.jit
def _uses_plain_global(X, Y, N, BLOCK: tl.constexpr):
    i = tl.arange(0, BLOCK)
    tl.store(Y + i, tl.load(X + i, mask=i < N) * SCALE, mask=i < N)


@triton.jit
def _spills(X, Y, BLOCK: tl.constexpr):
    # a 128 x 128 fp32 accumulator held by one warp (512 values a thread), live across a
    # second product: past the 255 registers a thread can have
    m = tl.arange(0, BLOCK)
    k = tl.arange(0, 16)
    a = tl.load(X + m[:, None] * 16 + k[None, :])
    b = tl.load(X + k[:, None] * BLOCK + m[None, :])
    acc = tl.dot(a, b)
    acc = tl.dot(a, b, acc * acc)
    tl.store(Y + m[:, None] * BLOCK + m[None, :], acc)


@triton.jit
def _product_off_tensor_cores(X, Y, BLOCK: tl.constexpr):
    # a bf16 matrix-vector product written as a broadcast multiply and a sum: CUDA cores only
    m = tl.arange(0, BLOCK)
    a = tl.load(X + m[:, None] * BLOCK + m[None, :])
    v = tl.load(X + m)
    tl.store(Y + m, tl.sum(a.to(tl.float32) * v.to(tl.float32)[None, :], axis=1))


@triton.jit
def _one_product_upcast(X, Y, BLOCK: tl.constexpr):
    m = tl.arange(0, BLOCK)
    a = tl.load(X + m[:, None] * BLOCK + m[None, :])
    b = tl.load(X + m[:, None] + m[None, :] * BLOCK)
    c = tl.dot(a, b)  # on the tensor cores
    d = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")  # on the CUDA cores
    tl.store(Y + m[:, None] * BLOCK + m[None, :], c + d)


def gpu_launches():
    x = torch.randn(256 * 256).to(torch.bfloat16)
    y = torch.empty(256 * 256, dtype=torch.float32)
    return [
        ("plain global", lambda: _uses_plain_global[(1,)](x, y, 64, BLOCK=64)),
        ("spill", lambda: _spills[(1,)](x, y, BLOCK=128, num_warps=1)),
        ("no tensor cores", lambda: _product_off_tensor_cores[(1,)](x, y, BLOCK=64)),
        ("one product upcast", lambda: _one_product_upcast[(1,)](x, y, BLOCK=32)),
    ]
