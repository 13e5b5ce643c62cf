"""Composition blocks (Stack, Average, Fuse, BatchSplit, Parallel) in BERT, Llama and GPT-2
models on tiny random configs: outputs and the gradients of every adapter and fusion
parameter against the float64 composition written out by hand, branch by branch (the
fusion attention with explicit query, key and value projections), and refusals."""

import copy
import inspect
import types

import pytest
import torch
import torch.nn.functional as F
from transformers import BertConfig, BertModel, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

import fastadapter as fa
from fastadapter import Average, BatchSplit, Fuse, Parallel, Stack

from .helpers import rel_err, torch_act

ARCHS = {
    "bert": lambda: BertModel(
        BertConfig(hidden_size=40, num_hidden_layers=2, num_attention_heads=2, intermediate_size=72, vocab_size=97)
    ),  # fmt: skip
    "llama": lambda: LlamaForCausalLM(
        LlamaConfig(
            vocab_size=97, hidden_size=40, intermediate_size=72, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2
        )
    ),  # fmt: skip
    "gpt2": lambda: GPT2LMHeadModel(GPT2Config(vocab_size=97, n_embd=40, n_layer=2, n_head=4, n_positions=64)),
}
IDS = torch.randint(3, 97, (3, 7), generator=torch.Generator().manual_seed(0))
# a and b share activation and scaling (merged and mixed-op paths); c differs in both (loops)
ADAPTERS = {
    "a": dict(bottleneck_size=8),
    "b": dict(bottleneck_size=5),
    "c": dict(bottleneck_size=8, activation="gelu", scaling=0.5),
}
SETUPS = {
    "stack": Stack("a", "b"),
    "stack3": Stack("a", "c", "b"),
    "average": Average("a", "b", weights=[0.3, 0.7]),
    "average_mixed": Average("a", "b", "c", weights=[0.2, 0.3, 0.5]),
    "average_adapterhub": Average("a", "b", "c", form="adapterhub"),
    "average_of_stack": Average(Stack("a", "b"), "c"),
    "fuse": Fuse("a", "b", "c"),
    "fuse_of_stack": Fuse(Stack("a", "b"), "c"),
    "stack_then_fuse": Stack("c", Fuse("a", "b")),
    "batchsplit": BatchSplit("a", "b", batch_sizes=[2, 1]),
    "batchsplit_mixed": BatchSplit("a", Stack("b", "c"), batch_sizes=[1, 2]),
    "stack_then_average": Stack("c", Average("a", "b")),
    "parallel": Parallel("a", "b"),
}
PARALLEL_PLACEMENT = ("average", "average_mixed", "average_adapterhub", "batchsplit", "parallel")


def _model(arch, placement):
    torch.manual_seed(0)
    model = ARCHS[arch]().eval()
    for name, kw in ADAPTERS.items():
        fa.add_adapters(model, fa.AdapterConfig(placement=placement, **kw), name)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if ".adapters." in pname:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
    return model


def _fusions(model, setup, seed=4):
    g = torch.Generator().manual_seed(seed)
    for block in _walk(setup):
        if isinstance(block, Fuse):
            fa.add_fusion(model, block)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if ".adapter_fusion_layer." in pname:
                p.add_(0.3 * torch.randn(p.shape, generator=g))


def _walk(block):
    yield block
    for c in block:
        if not isinstance(c, str):
            yield from _walk(c)


def _branch(P, prefix):
    """A_i(u) with adapter i's float64 leaves; None where the site has no such adapter."""
    if prefix + "down.weight" not in P:
        return None
    config = P["configs"][prefix.split(".adapters.")[1].rstrip(".")]
    act, s = config.activation, config.scaling

    def f(u):
        z = torch_act(F.linear(u, P[prefix + "down.weight"], P[prefix + "down.bias"]), act)
        return s * F.linear(z, P[prefix + "up.weight"], P[prefix + "up.bias"])

    return f


def reference(setup, f, x, u, P, site, copies=None):
    """The new sub-layer output f under ``setup``, written out one branch at a time."""
    if isinstance(setup, str):
        a = _branch(P, f"{site}adapters.{setup}.")
        return f if a is None else f + a(u(f, x))
    if isinstance(setup, Stack):
        for c in setup:
            f = reference(c, f, x, u, P, site, copies)
        return f
    if isinstance(setup, Average):
        outs = [reference(c, f, x, u, P, site, copies) for c in setup]
        if setup.form == "adapterhub":
            return sum(w * o for w, o in zip(setup.weights, outs)) / len(outs)
        return f + sum(w * (o - f) for w, o in zip(setup.weights, outs))
    if isinstance(setup, (BatchSplit, Parallel)):
        sizes = setup.batch_sizes if isinstance(setup, BatchSplit) else [copies] * len(setup)
        parts, start = [], 0
        for c, n in zip(setup, sizes):
            parts.append(reference(c, f[start : start + n], x[start : start + n], u, P, site, copies))
            start += n
        return torch.cat(parts)
    assert isinstance(setup, Fuse)
    fz = f"{site}adapter_fusion_layer.{setup.name}."
    q = u(f, x)
    branches = [reference(c, f, x, u, P, site, copies) - f for c in setup]
    query = F.linear(q, P[fz + "query.weight"], P[fz + "query.bias"])
    scores = torch.stack([(F.linear(v, P[fz + "key.weight"], P[fz + "key.bias"]) * query).sum(-1) for v in branches], -1)
    p = torch.softmax(scores, -1)
    context = sum(p[..., i : i + 1] * v for i, v in enumerate(branches))
    return f + F.linear(context, P[fz + "value.weight"])


def _reference_model(model, setup, placement, copies):
    """A float64 copy without fastadapter whose sites compute ``reference`` by hand."""
    ref = copy.deepcopy(model)
    for n in list(fa.adapter_configs(ref)):
        fa.remove_adapter(ref, n)
    ref = ref.double()
    P = {n: p.detach().double().clone().requires_grad_() for n, p in model.named_parameters()
         if ".adapters." in n or ".adapter_fusion_layer." in n}  # fmt: skip
    P["configs"] = fa.adapter_configs(model)
    sites = ("attention", "output") if placement == "houlsby" else ("output",)

    def u_of(norm=None):
        def u(f, x):
            t = {"houlsby": f, "parallel": x, "pfeiffer": x + f}[placement]
            return norm(x + f) if norm is not None and placement == "pfeiffer" else t

        return u

    if isinstance(model, BertModel):
        for i, layer in enumerate(ref.encoder.layer):
            for kind, mod, root in (("attention", layer.attention.output, f"encoder.layer.{i}.attention.output."),
                                    ("output", layer.output, f"encoder.layer.{i}.output.")):  # fmt: skip
                if kind not in sites:
                    continue

                def forward(self, hidden_states, input_tensor, root=root):
                    h = self.dropout(self.dense(hidden_states))
                    h = reference(setup, h, input_tensor, u_of(self.LayerNorm), P, root, copies)
                    return self.LayerNorm(h + input_tensor)

                mod.forward = types.MethodType(forward, mod)
        return ref, P
    gpt2 = hasattr(ref, "transformer")
    blocks = ref.transformer.h if gpt2 else ref.model.layers
    for i, block in enumerate(blocks):
        root = f"transformer.h.{i}." if gpt2 else f"model.layers.{i}."
        attn_name = "attn" if gpt2 else "self_attn"

        def forward(self, hidden_states, *args, root=root, attn_name=attn_name, **kwargs):
            kwargs.update(zip(list(inspect.signature(type(self).forward).parameters)[2:], args))
            x = hidden_states
            if gpt2:
                f = self.attn(self.ln_1(x), **{k: v for k, v in kwargs.items() if not k.startswith("encoder_")})[0]
            else:
                f = self.self_attn(hidden_states=self.input_layernorm(x), **kwargs)[0]
            if "attention" in sites:
                f = reference(setup, f, x, u_of(), P, f"{root}{attn_name}.", copies)
            x = x + f
            f = self.mlp(self.ln_2(x) if gpt2 else self.post_attention_layernorm(x))
            return x + reference(setup, f, x, u_of(), P, f"{root}mlp.", copies)

        block.forward = types.MethodType(forward, block)
    return ref, P


def _output(model, ids):
    out = model(input_ids=ids)
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out.logits


CASES = [(arch, placement, key) for arch in ARCHS for placement in ("pfeiffer", "houlsby", "parallel") for key in SETUPS
         if placement != "parallel" or key in PARALLEL_PLACEMENT]  # fmt: skip


@pytest.mark.parametrize("arch,placement,key", CASES)
def test_outputs_and_gradients_match_the_float64_composition(arch, placement, key):
    setup = SETUPS[key]
    model = _model(arch, placement)
    _fusions(model, setup)
    fa.set_active_adapter(model, setup)
    copies = IDS.shape[0] if isinstance(setup, Parallel) else None
    ref, P = _reference_model(model, setup, placement, copies)
    out = _output(model, IDS)
    want = _output(ref, IDS.repeat(2, 1) if copies else IDS)
    assert out.shape == want.shape
    assert rel_err(out.detach(), want.detach()) <= 1e-5
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    named = {n: p for n, p in model.named_parameters() if n in P}
    got = torch.autograd.grad(out, list(named.values()), grad, allow_unused=True)
    wanted = torch.autograd.grad(want, [P[n] for n in named], grad.double(), allow_unused=True)
    used = 0
    for n, a, b in zip(named, got, wanted):
        if b is None:  # a parameter the composition does not read
            assert a is None or not a.any(), n
            continue
        if n.endswith("key.bias"):  # it adds the same to every score: its gradient is 0 up to rounding
            assert b.abs().max() <= 1e-12 and (a is None or a.abs().max() <= 1e-5), n
            continue
        assert rel_err(a, b) <= 3e-5, n  # fp32 through products of random d x d fusion weights
        used += 1
    assert used >= len(setup.names()) * 4


def test_average_of_one_adapter_twice_is_that_adapter_and_adapterhubs_form_is_not():
    model = _model("llama", "pfeiffer")
    fa.set_active_adapter(model, "a")
    with torch.no_grad():
        single = _output(model, IDS)
        fa.set_active_adapter(model, Average("a", "a"))
        assert rel_err(_output(model, IDS), single) <= 1e-6
        fa.set_active_adapter(model, Average("a", "a", form="adapterhub"))  # F scaled by sum(w) / n = 1/2
        assert rel_err(_output(model, IDS), single) > 1e-2


def test_a_fresh_dynamic_fusion_of_one_adapter_twice_is_that_adapter():
    """W_v starts at the identity and both branches are equal, so any attention gives a."""
    model = _model("bert", "pfeiffer")
    fa.add_fusion(model, Fuse("a", "a", name="aa"))
    with torch.no_grad():
        fa.set_active_adapter(model, "a")
        single = _output(model, IDS)
        fa.set_active_adapter(model, Fuse("a", "a", name="aa"))
        assert rel_err(_output(model, IDS), single) <= 1e-5


@pytest.mark.parametrize(
    "setup,placement,match",
    [
        (Stack("a", "zz"), "pfeiffer", "names no adapter 'zz'"),
        (Fuse("a", "b"), "pfeiffer", r"add_fusion\(model"),
        (Fuse(Average("a", "b"), "c"), "pfeiffer", "Average cannot sit inside Fuse"),
        (Average(Fuse("a", "b"), "c"), "pfeiffer", "Fuse cannot sit inside Average"),
        (Stack("a", Stack("b", "c")), "pfeiffer", "Stack cannot sit inside Stack"),
        (Fuse(Parallel("a", "b"), "c"), "pfeiffer", "Parallel cannot sit inside Fuse"),
        (Stack("a", "b"), "parallel", "parallel adapters all read the site's input"),
    ],
)
def test_bad_compositions_are_refused_by_name(setup, placement, match):
    model = _model("bert", placement)
    with pytest.raises(ValueError, match=match):
        fa.set_active_adapter(model, setup)
    assert fa.active_adapter(model) == "c"  # the last added: unchanged


def test_mixed_placements_and_bad_arguments_are_refused():
    model = _model("llama", "pfeiffer")
    fa.add_adapters(model, fa.AdapterConfig(placement="houlsby", bottleneck_size=4), "h")
    with pytest.raises(ValueError, match="mixes a: pfeiffer, h: houlsby"):
        fa.set_active_adapter(model, Average("a", "h"))
    with pytest.raises(ValueError, match="fuses pfeiffer or houlsby adapters of one placement"):
        fa.add_fusion(model, ["a", "h"])
    with pytest.raises(ValueError, match="names no adapter 'q'"):
        fa.add_fusion(model, "a,q")
    with pytest.raises(TypeError, match="pass a composition block alone"):
        fa.set_active_adapter(model, [Stack("a", "b")])
    with pytest.raises(ValueError, match="2 children but 3 weights"):
        Average("a", "b", weights=[1, 2, 3])
    with pytest.raises(ValueError, match="unknown Average form"):
        Average("a", "b", form="mean")
    with pytest.raises(TypeError, match="got int 3"):
        Stack("a", 3)
    with pytest.raises(ValueError, match="query_before_ln=True is not supported"):
        fa.add_fusion(model, "a,b", {"query_before_ln": True})
    parallel = _model("bert", "parallel")
    with pytest.raises(ValueError, match="fuses pfeiffer or houlsby"):
        fa.add_fusion(parallel, "a,b")


def test_a_batchsplit_that_does_not_cover_the_batch_is_refused():
    model = _model("llama", "pfeiffer")
    fa.set_active_adapter(model, BatchSplit("a", "b", batch_sizes=[1, 1]))
    with pytest.raises(ValueError, match=r"batch_sizes \[1, 1\] cover 2 examples, the batch has 3"):
        _output(model, IDS)


def test_parallel_replicates_the_batch_and_refuses_a_cache_passed_in():
    model = _model("llama", "pfeiffer")
    fa.set_active_adapter(model, Parallel("a", "b"))
    with torch.no_grad():
        out = _output(model, IDS)
        assert out.shape[0] == 2 * IDS.shape[0]
        for i, name in enumerate(("a", "b")):  # copy i is adapter i alone
            fa.set_active_adapter(model, name)
            assert rel_err(out[i * 3 : (i + 1) * 3], _output(model, IDS)) <= 1e-6
        fa.set_active_adapter(model, Parallel("a", "b"))
        with pytest.raises(ValueError, match="does not run with a key/value cache passed in"):
            model.generate(IDS, max_new_tokens=3, do_sample=False, pad_token_id=0)
        fa.set_active_adapter(model, "a")  # the replicating hook goes with the composition
        assert _output(model, IDS).shape[0] == IDS.shape[0]


def test_fusion_layers_train_alone_and_save_and_load_with_their_adapters(tmp_path):
    model = _model("bert", "pfeiffer")
    name = fa.add_fusion(model, ["a", "b", "c"])
    assert name == "a,b,c" and fa.fusion_configs(model)[name][0] == ["a", "b", "c"]
    counts = fa.mark_only_fusion_trainable(model, train_head=False)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".adapter_fusion_layer.a,b,c." in n for n in trainable)
    assert counts["trainable"] == counts["fusion"] == 2 * (3 * 40 * 40 + 2 * 40)  # two output sites: q, k (bias), v
    assert fa.fusion_regularization(model).item() == pytest.approx(2 * 0.01 * 40 * 39 * 1e-12, rel=1e-3)
    with pytest.raises(ValueError, match="already has a fusion layer 'a,b,c'"):
        fa.add_fusion(model, Fuse("a", "b", "c"))
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.3 * torch.randn(p.shape, generator=g))
    fa.set_active_adapter(model, Fuse("a", "b", "c"))
    with torch.no_grad():
        want = _output(model, IDS)
    fa.save_adapters(model, tmp_path)
    fresh = ARCHS["bert"]()
    fresh.load_state_dict(model.state_dict(), strict=False)
    fresh.eval()
    fa.load_adapters(fresh, tmp_path)
    assert fa.fusion_configs(fresh)[name][0] == ["a", "b", "c"]
    fa.set_active_adapter(fresh, Fuse("a", "b", "c"))
    with torch.no_grad():
        assert torch.equal(_output(fresh, IDS), want)
    fa.remove_adapter(fresh, "b")  # takes the fusion layer over it along
    assert fa.fusion_configs(fresh) == {} and fa.active_adapter(fresh) is None
    assert not any(".adapter_fusion_layer." in n for n, _ in fresh.named_parameters())


@pytest.mark.parametrize(
    "setup,fwd,bwd",
    [
        (Average("a", "b", "a2", "b2"), ["adapter_forward"], ["adapter_backward"]),
        (Stack("a", "b"), ["adapter_forward"] * 2, ["adapter_backward"] * 2),
        (BatchSplit("a", "b", "a2", "b2", batch_sizes=[3, 3, 3, 3]), ["mixed_adapter_forward"], ["mixed_adapter_backward"]),
    ],
)
def test_blocks_of_adapters_run_as_the_fused_ops_alone(setup, fwd, bwd):
    """Over the rows, Average of 4 is one adapter op forward and one backward, a Stack one per
    adapter, a BatchSplit one mixed-adapter op; anything else they run touches weights (or a
    BatchSplit's integer row index) only."""
    from torch.utils._python_dispatch import TorchDispatchMode

    rows = 12

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            flat = torch.utils._pytree.tree_leaves((args, kwargs, out))
            view = func.is_view or func.overloadpacket.__name__ in ("_unsafe_view", "detach")
            rowed = [t for t in flat if isinstance(t, torch.Tensor) and t.dim() and t.shape[0] == rows]
            if any(t.is_floating_point() for t in rowed) and not view:  # the row index a BatchSplit builds: ints
                self.names.append(func.overloadpacket.__name__)
            return out

    owner = torch.nn.Module()
    owner.adapters = torch.nn.ModuleDict({n: fa.FusedAdapter(16, 4, backend="reference") for n in ("a", "b", "a2", "b2")})
    owner.__dict__["_fastadapter_placement"] = dict.fromkeys(owner.adapters, "houlsby")
    h = torch.randn(rows, 16, requires_grad=True)
    forward, backward, dy = Ops(), Ops(), torch.randn(rows, 16)
    with forward:
        y = fa.hf.compose.apply(owner, setup, h, None)
    with backward:
        torch.autograd.grad(y, [h, *owner.parameters()], dy, allow_unused=True)
    assert forward.names == fwd
    assert backward.names == bwd


def test_a_block_whose_adapters_a_layer_leaves_out_leaves_that_layer_alone():
    """leave_out gives some layers none of a nested block's adapters: there the block adds
    nothing, and the other steps run as they would."""
    torch.manual_seed(0)
    model = ARCHS["llama"]().eval()
    fa.add_adapters(model, fa.AdapterConfig(placement="pfeiffer", bottleneck_size=4), "a")
    for n in ("b", "c"):
        fa.add_adapters(model, fa.AdapterConfig(placement="pfeiffer", bottleneck_size=4, leave_out=[0]), n)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if ".adapters." in pname:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
    with torch.no_grad():
        fa.set_active_adapter(model, Stack("a", Average("b", "c")))
        got = _output(model, IDS)
        fa.set_active_adapter(model, "a")
        only_a = _output(model, IDS)
        fa.remove_adapter(model, "b")
        fa.remove_adapter(model, "c")
        assert rel_err(got, only_a) > 1e-3  # layer 1 ran the Average
        fa.add_adapters(model, fa.AdapterConfig(placement="pfeiffer", bottleneck_size=4, leave_out=[0, 1]), "b")
        fa.set_active_adapter(model, Stack("a", Average("b", "b")))  # no layer has b: a alone
        assert rel_err(_output(model, IDS), only_a) <= 1e-6


@pytest.mark.parametrize("key", ["stack_then_fuse", "batchsplit_mixed"])
def test_a_compiled_model_runs_a_composition_without_a_graph_break(key):
    setup = SETUPS[key]
    model = _model("llama", "pfeiffer")
    _fusions(model, setup)
    fa.set_active_adapter(model, setup)
    torch._dynamo.reset()
    with torch.no_grad():
        want = _output(model, IDS)
        got = _output(torch.compile(model, fullgraph=True), IDS)
    assert rel_err(got, want) <= 1e-5


def test_fuse_fold_is_kept_under_no_grad_until_what_it_reads_changes(monkeypatch):
    """Under no_grad the fold of W_q, W_k, W_v into the adapters' W_up is formed once and kept
    on the fusion layer; any change to what it reads (a weight in place, a weight replaced, a
    scaling, a state dict loaded) forms it again, so the output always equals a fresh one's.
    Where autograd records, it is formed every call."""
    from fastadapter import composition

    torch.manual_seed(0)
    d = 24
    adapters = [fa.FusedAdapter(d, r, activation="gelu") for r in (4, 6, 5)]
    fusion = fa.AdapterFusion(d)
    with torch.no_grad():
        for p in [*fusion.parameters(), *(p for a in adapters for p in a.parameters())]:
            p.add_(0.3 * torch.randn(p.shape))
    u = torch.randn(7, d)
    folds = []
    real = composition._folded
    monkeypatch.setattr(composition, "_folded", lambda *a: folds.append(1) or real(*a))

    def fresh():  # with autograd on: no cache
        return composition.fuse_adapters(u, adapters, fusion).detach()

    def kept():
        with torch.no_grad():
            return composition.fuse_adapters(u, adapters, fusion)

    want = fresh()
    assert torch.equal(kept(), want) and torch.equal(kept(), want)
    assert len(folds) == 2  # once with autograd on, once for both no_grad calls

    def changed(edit):
        before = kept()
        with torch.no_grad():
            edit()
        got, n = kept(), len(folds)
        assert torch.equal(got, fresh()) and not torch.equal(got, before)
        assert torch.equal(kept(), got) and len(folds) == n + 1  # the new fold is kept in turn

    changed(lambda: fusion.value.weight.mul_(1.5))
    changed(lambda: adapters[1].up.weight.add_(0.1))
    changed(lambda: adapters[2].up.bias.add_(0.1))
    changed(lambda: setattr(fusion.query, "weight", torch.nn.Parameter(2 * fusion.query.weight)))
    changed(lambda: setattr(adapters[0], "scaling", 0.5 * adapters[0].scaling))
    other = fa.AdapterFusion(d)
    changed(lambda: fusion.load_state_dict(other.state_dict()))
