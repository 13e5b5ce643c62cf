"""Adapters under FSDP2 and DDP: 2 processes with the gloo backend on the CPU (the cpp
backend), against one process on the same global batch.

One spawn runs every case (each rank its half of the batch) and writes what it saw; the
tests then compare. Gradients are the mean over the ranks' halves, so they equal the one
process's gradient of the mean of the two halves' losses up to fp32 reduction order
(bounded here at 1e-6 relative to the largest entry).
"""

from __future__ import annotations

import os
import socket
import warnings

import pytest
import torch
import torch.multiprocessing as mp
import torch.utils._pytree as pytree
from torch.distributed.tensor import DTensor
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM

import fastadapter as fa
from fastadapter.hf.distributed import is_sharded

pytestmark = pytest.mark.slow
WORLD = 2
LLAMA = dict(vocab_size=97, hidden_size=40, intermediate_size=72, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64)  # fmt: skip
BERT = dict(vocab_size=97, hidden_size=40, intermediate_size=72, num_hidden_layers=2, num_attention_heads=4, num_labels=3,
            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)  # each process would drop other units  # fmt: skip
IDS = torch.randint(3, 97, (4, 9), generator=torch.Generator().manual_seed(0))
LABELS = torch.tensor([0, 2, 1, 2])
ROUTES = torch.tensor([1, -1, 0, 1])  # example -> active adapter (-1: none)


def _randomize(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".adapters." in n:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
            elif ".adapter_fusion_layer." in n:
                p.add_(0.2 * torch.randn(p.shape, generator=g))


def build(kind: str):
    """A tiny model with adapters (random, so that every gradient is non-zero), only they train."""
    torch.manual_seed(0)
    if kind == "bert":
        model = BertForSequenceClassification(BertConfig(**BERT))
        fa.add_adapters(model, fa.AdapterConfig(placement="houlsby", reduction_factor=4), "a")
    else:
        model = LlamaForCausalLM(LlamaConfig(**LLAMA))
        fa.add_adapters(model, fa.AdapterConfig(placement="houlsby", reduction_factor=4), "a")
        if kind in ("routed", "switched", "composed"):
            fa.add_adapters(model, fa.AdapterConfig(placement="houlsby", reduction_factor=4), "b")
            fa.set_active_adapter(model, ["a", "b"] if kind == "routed" else "a")
        if kind == "composed":  # a Stack whose last step is a fusion layer: trained with the adapters
            fa.add_fusion(model, ["a", "b"])
            fa.set_active_adapter(model, fa.Stack("b", fa.Fuse("a", "b")))
    _randomize(model)
    fa.mark_only_adapters_trainable(model, train_head=False)
    return model


def switch(model, kind: str):
    """After sharding: the switched case makes its second adapter active."""
    if kind == "switched":
        fa.set_active_adapter(model, "b")
    return model


def loss_of(model, kind: str, rows: slice):
    ids = IDS[rows]
    if kind == "bert":
        return model(input_ids=ids, labels=LABELS[rows]).loss
    if kind == "routed":
        with fa.adapter_routing(model, ROUTES[rows]):
            return model(input_ids=ids, labels=ids).loss
    return model(input_ids=ids, labels=ids).loss


def _grads(model) -> dict:
    from fastadapter.hf.distributed import full

    return {n: full(p.grad).clone() for n, p in model.named_parameters() if p.grad is not None}


def _step(model, kind, rows, divide: int = 1):
    """The loss on ``rows`` and its backward (of loss / divide); ``model`` may be a DDP wrapper."""
    loss = loss_of(model, kind, rows)
    inner = getattr(model, "module", model)
    with fa.adapter_routing(inner, ROUTES[rows]) if kind == "routed" else _null():
        (loss / divide).backward()
    return loss.detach()


def _null():
    import contextlib

    return contextlib.nullcontext()


class OpInputs(TorchDispatchMode):
    """Counts the fastadapter ops that run (forward and backward) and which got a DTensor."""

    def __enter__(self):
        self.calls, self.dtensors = {}, []
        return super().__enter__()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace == "fastadapter":
            name = func.__name__.split(".")[0]
            self.calls[name] = self.calls.get(name, 0) + 1
            if any(isinstance(a, DTensor) for a in pytree.tree_leaves((args, kwargs))):
                self.dtensors.append(name)
        return func(*args, **kwargs)


def worker(rank: int, port: int, out: str) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    seen: dict = {}
    half = slice(rank * 2, rank * 2 + 2)
    try:
        for kind in ("bert", "llama", "routed", "switched", "composed"):
            model = switch(fa.shard_model(build(kind)), kind)
            with OpInputs() as ops, warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                loss = _step(model, kind, half)
            dist.all_reduce(loss)
            seen[f"fsdp/{kind}"] = {"loss": loss / WORLD, "grads": _grads(model), "sharded": is_sharded(model),
                                    "ops": ops.calls, "dtensor_inputs": ops.dtensors,
                                    "warnings": [str(w.message) for w in caught]}  # fmt: skip
            if kind == "composed":  # an evaluation: under no_grad the Fuse's fold is not kept here
                with torch.no_grad():
                    loss_of(model, kind, half)
                seen["fold_kept"] = any("_fold_cache" in m.__dict__ for m in model.modules())
        model = DistributedDataParallel(build("llama"))
        loss = _step(model, "llama", half)
        dist.all_reduce(loss)
        seen["ddp/llama"] = {"loss": loss / WORLD, "grads": _grads(model.module)}

        # checkpoints: written once, whole, by the sharded model; read into a sharded model
        model = fa.shard_model(build("routed"))
        fa.save_adapters(model, os.path.join(out, "fsdp-ckpt"))
        fa.save_adapterhub(model, os.path.join(out, "fsdp-hub"), "a")
        seen["state"] = {k: v.clone() for k, v in fa.adapter_state_dict(model).items()}
        target = build("routed")
        _randomize(target, seed=9)  # other weights, to be overwritten
        fa.shard_model(target)
        fa.load_adapters(target, os.path.join(out, "single-ckpt"))
        seen["loaded"] = fa.adapter_state_dict(target)
        try:
            fa.add_adapters(target, fa.AdapterConfig(), "late")
        except ValueError as e:
            seen["late"] = str(e)
    finally:
        torch.save(seen, os.path.join(out, f"rank{rank}.pt"))
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    from fastadapter.backends import extension

    extension.load()  # built once here, not by two processes at once
    out = str(tmp_path_factory.mktemp("dist"))
    single = build("routed")
    _randomize(single, seed=4)
    fa.save_adapters(single, os.path.join(out, "single-ckpt"))
    mp.spawn(worker, args=(_free_port(), out), nprocs=WORLD)
    return out, [torch.load(os.path.join(out, f"rank{r}.pt")) for r in range(WORLD)]


def _single(kind: str) -> dict:
    model = switch(build(kind), kind)
    losses = [_step(model, kind, slice(r * 2, r * 2 + 2), divide=WORLD) for r in range(WORLD)]  # grads: the mean
    return {"loss": sum(losses) / WORLD, "grads": {n: p.grad for n, p in model.named_parameters() if p.grad is not None}}


def _assert_same(got: dict, want: dict) -> None:
    assert abs(float(got["loss"]) - float(want["loss"])) <= 1e-6 * max(1.0, abs(float(want["loss"])))
    assert set(got["grads"]) == set(want["grads"]) and got["grads"]
    for name, g in want["grads"].items():
        assert g.abs().max() > 0, name
        err = (got["grads"][name] - g).abs().max() / g.abs().max()
        assert err <= 1e-6, f"{name}: {err:.2e}"


@pytest.mark.parametrize("case", ["fsdp/bert", "fsdp/llama", "fsdp/routed", "fsdp/switched", "fsdp/composed", "ddp/llama"])
def test_two_ranks_give_one_process_loss_and_adapter_gradients(ranks, case):
    _, seen = ranks
    want = _single(case.split("/")[1])
    for rank in seen:
        assert case in rank, f"rank did not finish {case}"
        _assert_same(rank[case], want)
    if case.startswith("fsdp"):  # sharded, and every op saw the gathered plain tensors
        for rank in seen:
            assert rank[case]["sharded"] and rank[case]["ops"] and not rank[case]["dtensor_inputs"]
            assert set(rank[case]["ops"]) == OPS[case], rank[case]["ops"]
            # a layer's output is no autograd view (FSDP2 warns: an in-place op on it would skip its hook)
            assert not [w for w in rank[case]["warnings"] if "view" in w], rank[case]["warnings"]


OPS = {  # the ops each sharded case runs, forward and backward
    "fsdp/bert": {"adapter_layernorm_forward", "adapter_layernorm_backward"},
    "fsdp/llama": {"adapter_rmsnorm_forward", "adapter_rmsnorm_backward", "adapter_forward", "adapter_backward"},
    "fsdp/switched": {"adapter_rmsnorm_forward", "adapter_rmsnorm_backward", "adapter_forward", "adapter_backward"},
    "fsdp/routed": {"mixed_adapter_forward", "mixed_adapter_backward"},
    "fsdp/composed": {"adapter_forward", "adapter_backward"},  # the Stack's adapter; the Fuse is ATen ops
}


def test_sharded_checkpoints_are_whole_and_load_both_ways(ranks):
    out, seen = ranks
    want = fa.adapter_state_dict(build("routed"))
    # written by rank 0 from the sharded model: loads bit for bit into one process
    single = LlamaForCausalLM(LlamaConfig(**LLAMA))
    assert fa.load_adapters(single, os.path.join(out, "fsdp-ckpt")) == ["a", "b"]
    got = fa.adapter_state_dict(single)
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
    for rank in seen:  # every rank gathered the whole tensors
        assert all(torch.equal(rank["state"][k], want[k]) for k in want)
    hub = LlamaForCausalLM(LlamaConfig(**LLAMA))
    assert fa.load_adapterhub(hub, os.path.join(out, "fsdp-hub")) == "a"
    assert all(torch.equal(v, want[k]) for k, v in fa.adapter_state_dict(hub).items())
    # written by one process: loads into the shards of a sharded model
    ref = build("routed")
    _randomize(ref, seed=4)
    for rank in seen:
        assert all(torch.equal(rank["loaded"][k], v) for k, v in fa.adapter_state_dict(ref).items())


def test_fuse_fold_is_not_kept_in_a_process_group(ranks):
    """FSDP2 refills its unsharded parameter objects in place between forwards: a fold kept
    across them could go stale unseen, so under a process group it is formed every call."""
    for rank in ranks[1]:
        assert rank["fold_kept"] is False


def test_adding_adapters_to_a_sharded_model_is_refused(ranks):
    for rank in ranks[1]:
        assert "add adapters before sharding the model" in rank["late"]
