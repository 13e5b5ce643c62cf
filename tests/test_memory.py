"""fastadapter/cli/memory.py measures what it says: bytes saved for the backward, known by hand."""

import torch

from fastadapter.cli import memory


def test_saved_bytes_of_one_adapter_call_known_by_hand():
    n, d, r = 256, 64, 8
    calls = {c["provider"]: c for c in memory.per_call(n, d, r, torch.float32)}
    # the fused op saves x and the fp32 pre-activation z, nothing else
    assert calls["fastadapter"]["saved"] == 4 * (n * d + n * r)
    # eager: the first Linear saves x, gelu saves z, the second Linear saves a = gelu(z)
    assert calls["eager"]["saved"] == 4 * (n * d + 2 * n * r)
    assert calls["fastadapter"]["peak"] > 0


def test_saved_bytes_leave_out_parameters_and_count_storages_once():
    w = torch.nn.Parameter(torch.randn(32, 32))
    x = torch.randn(16, 32, requires_grad=True)
    saved, _ = memory.saved_bytes(lambda: (x @ w) @ w, exclude=[w])
    # the two products save x and (x @ w); w twice, but w is a parameter
    assert saved == 4 * (16 * 32 + 16 * 32)


def test_peak_bytes_sees_a_temporary():
    def fn():
        t = torch.ones(1024, 1024)  # 4 MiB, freed at once
        del t

    assert memory.peak_bytes(fn) >= 4 * 2**20


def test_train_step_adapters_add_to_the_floor():
    cfg = memory.bert_base_config(layers=2, hidden=64, heads=2, vocab=100)
    floor = memory.train_step("floor", cfg, batch=2, seq=16)
    fused = memory.train_step("fastadapter", cfg, batch=2, seq=16)
    eager = memory.train_step("eager", cfg, batch=2, seq=16)
    assert floor["saved"] < fused["saved"] < eager["saved"]
