"""Several active adapters in one batch: fastadapter.adapter_routing sends each example
through its own adapter, forward and backward, and matches running the examples one
adapter at a time."""

import pytest
import torch

import fastadapter as fa

from .helpers import rel_err
from .test_hf import ARCHS, BERT_STYLE

IDS = torch.randint(5, 120, (5, 7), generator=torch.Generator().manual_seed(1))
ROUTE = [1, 0, -1, 2, 0]  # example b -> active adapter ROUTE[b] (-1: none)
NAMES = ["topic", "sentiment", "lang"]


def _model(arch, placement, bottlenecks=(4, 8, 6)):
    torch.manual_seed(0)
    model = ARCHS[arch]().eval()
    for i, (name, factor) in enumerate(zip(NAMES, (48 // b for b in bottlenecks))):
        fa.add_adapters(model, fa.AdapterConfig(placement=placement, reduction_factor=factor, activation="gelu"), name)
        g = torch.Generator().manual_seed(10 + i)
        with torch.no_grad():
            for pname, p in model.named_parameters():
                if f"adapters.{name}." in pname:
                    p.copy_(0.2 * torch.randn(p.shape, generator=g))
    return model


def _one_by_one(model, loss_of):
    """Each example alone, with its adapter active: outputs, and the summed adapter gradients."""
    outs = []
    for b, k in enumerate(ROUTE):
        fa.set_active_adapter(model, None if k < 0 else NAMES[k])
        out = model(input_ids=IDS[b : b + 1]).last_hidden_state
        loss_of(out, b).backward()
        outs.append(out.detach())
    return torch.cat(outs)


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if ".adapters." in n and p.grad is not None}


@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("placement", ["houlsby", "pfeiffer", "parallel"])
def test_routing_matches_one_adapter_at_a_time(arch, placement):
    model = _model(arch, placement)
    target = torch.randn(5, 7, 48, generator=torch.Generator().manual_seed(2))

    def loss_of(out, b):
        return (out * target[b : b + 1]).sum()

    want = _one_by_one(model, loss_of)
    want_grads = _grads(model)
    model.zero_grad(set_to_none=True)
    fa.set_active_adapter(model, NAMES)
    assert fa.active_adapter(model) == NAMES
    with fa.adapter_routing(model, ROUTE):
        out = model(input_ids=IDS).last_hidden_state
        (out * target).sum().backward()
    torch.testing.assert_close(out.detach(), want, rtol=1e-5, atol=1e-5)
    got_grads = _grads(model)
    assert got_grads.keys() == want_grads.keys() and got_grads
    for n in want_grads:  # sums over other groupings of the rows: fp32 rounding apart
        assert rel_err(got_grads[n], want_grads[n]) <= 2e-5, n


@pytest.mark.parametrize("arch", BERT_STYLE[:1])
def test_routed_sites_run_the_mixed_op_and_one_active_adapter_stays_the_site_op(arch):
    model = _model(arch, "houlsby")
    fa.set_active_adapter(model, NAMES[:2])
    with torch.profiler.profile() as prof, fa.adapter_routing(model, [0, 1, 1, -1, 0]):
        model(input_ids=IDS)
    ops = {e.key: e.count for e in prof.key_averages()}
    assert ops.get("fastadapter::mixed_adapter_forward") == 6 and "fastadapter::adapter_layernorm_forward" not in ops
    fa.set_active_adapter(model, NAMES[:1])  # a list of one is that adapter: the site op, as before
    assert fa.active_adapter(model) == "topic"
    with torch.profiler.profile() as prof:
        model(input_ids=IDS)
    assert {e.key: e.count for e in prof.key_averages()}.get("fastadapter::adapter_layernorm_forward") == 6


def test_gradient_checkpointing_and_compile_route_the_same():
    model = _model("bert", "houlsby")
    fa.mark_only_adapters_trainable(model)
    fa.set_active_adapter(model, NAMES)
    model.train()  # dropout is 0.1 in these configs: switch it off so that runs compare
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    target = torch.randn(5, 7, 48, generator=torch.Generator().manual_seed(2))
    results = []
    for mode in ("plain", "checkpointing", "compile"):
        model.zero_grad(set_to_none=True)
        if mode == "checkpointing":
            model.gradient_checkpointing_enable()
        run = model
        if mode == "compile":
            model.gradient_checkpointing_disable()
            torch._dynamo.reset()
            run = torch.compile(model)
        with fa.adapter_routing(model, ROUTE):
            out = run(input_ids=IDS).last_hidden_state
            (out * target).sum().backward()
        results.append((out.detach(), _grads(model)))
    for out, grads in results[1:]:
        torch.testing.assert_close(out, results[0][0], rtol=1e-5, atol=1e-5)
        for n in grads:
            assert rel_err(grads[n], results[0][1][n]) <= 2e-5, n


def test_routing_errors_say_what_is_wrong():
    model = _model("bert", "houlsby")
    fa.set_active_adapter(model, NAMES)
    with pytest.raises(RuntimeError, match=r"3 adapters are active \(topic, sentiment, lang\): run the model inside"):
        model(input_ids=IDS)
    with pytest.raises(ValueError, match=r"ids must lie in \[-1, 3\)"):
        with fa.adapter_routing(model, [0, 3, 0, 0, 0]):
            pass
    with pytest.raises(TypeError, match="ids must be a 1-D integer tensor"):
        with fa.adapter_routing(model, torch.zeros(5)):
            pass
    with fa.adapter_routing(model, [0, 1]), pytest.raises(ValueError, match="ids for 2 examples, the batch has 5"):
        model(input_ids=IDS)
    fa.set_active_adapter(model, "topic")
    with pytest.raises(ValueError, match="needs several active adapters"):
        with fa.adapter_routing(model, [0] * 5):
            pass
    fa.add_adapters(model, fa.AdapterConfig(placement="pfeiffer"), "other")
    with pytest.raises(ValueError, match="must share their placement: 'topic' has 'houlsby', 'other' has 'pfeiffer'"):
        fa.set_active_adapter(model, ["topic", "other"])
    with pytest.raises(ValueError, match="no adapter named 'nope'"):
        fa.set_active_adapter(model, ["topic", "nope"])
