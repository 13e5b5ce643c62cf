"""Adapters in decoder LLMs (Llama, Mistral, Qwen2, Qwen3, GPT-2) on tiny random configs:
logits and every adapter gradient against the float64 composition written out by hand,
generation against the eager composition (single and routed), the fused norm handover,
gradient checkpointing, checkpoints, and refusals."""

import copy
import inspect
import types
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from transformers import (
    GemmaConfig,
    GemmaForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)
from transformers.models.llama.modeling_llama import LlamaRMSNorm

import fastadapter as fa

from .helpers import rel_err, torch_act

LLAMA = dict(vocab_size=97, hidden_size=40, intermediate_size=72, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64)  # fmt: skip
ARCHS = {
    "llama": lambda: LlamaForCausalLM(LlamaConfig(**LLAMA)),
    "mistral": lambda: MistralForCausalLM(MistralConfig(**LLAMA)),
    "qwen2": lambda: Qwen2ForCausalLM(Qwen2Config(**LLAMA)),
    "qwen3": lambda: Qwen3ForCausalLM(Qwen3Config(head_dim=10, **LLAMA)),
    "gpt2": lambda: GPT2LMHeadModel(GPT2Config(vocab_size=97, n_embd=40, n_layer=3, n_head=4, n_positions=64)),
}
PLACEMENTS = ("pfeiffer", "houlsby", "parallel")
IDS = torch.randint(3, 97, (2, 9), generator=torch.Generator().manual_seed(0))


def _model(arch, seed=0):
    torch.manual_seed(seed)
    return ARCHS[arch]().eval()


def _randomize(model, name, seed=3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if f".adapters.{name}." in pname:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))


def _blocks(model):
    if hasattr(model, "transformer"):
        return list(model.transformer.h)
    return list(model.model.layers)


def _branch(params, prefix, activation, scaling):
    """s * f(u) with the adapter parameters named prefix + down/up.weight/bias."""

    def f(u):
        z = F.linear(u, params[prefix + "down.weight"], params[prefix + "down.bias"])
        return scaling * F.linear(torch_act(z, activation), params[prefix + "up.weight"], params[prefix + "up.bias"])

    return f


def composition(model, name, config, dtype=torch.float64):
    """A copy of ``model`` without fastadapter in ``dtype`` whose layers compute the decoder
    sites by hand (x + F + A(u)), and its adapter parameters by name (leaves)."""
    ref = copy.deepcopy(model)
    fa.remove_adapter(ref, name)
    for n in list(fa.adapter_configs(ref)):
        fa.remove_adapter(ref, n)
    ref = ref.to(dtype)
    params = {n: p.detach().to(dtype).clone().requires_grad_() for n, p in model.named_parameters() if ".adapters." in n}
    act, s, placement = config.activation, config.scaling, config.placement
    gpt2 = hasattr(model, "transformer")
    for i, block in enumerate(_blocks(ref)):
        attn_name, mlp_name = ("attn", "mlp") if gpt2 else ("self_attn", "mlp")
        root = f"transformer.h.{i}." if gpt2 else f"model.layers.{i}."
        a_attn = _branch(params, f"{root}{attn_name}.adapters.{name}.", act, s) if placement == "houlsby" else None
        a_mlp = _branch(params, f"{root}{mlp_name}.adapters.{name}.", act, s) if i not in config.leave_out else None
        if i in config.leave_out:
            a_attn = None

        def forward(self, hidden_states, *args, a_attn=a_attn, a_mlp=a_mlp, **kwargs):
            names = list(inspect.signature(type(self).forward).parameters)[2:]
            kwargs.update(zip(names, args))
            x = hidden_states
            if gpt2:
                f = self.attn(self.ln_1(x), **{k: v for k, v in kwargs.items() if not k.startswith("encoder_")})[0]
            else:
                f = self.self_attn(hidden_states=self.input_layernorm(x), **kwargs)[0]
            x = x + f + (a_attn(f) if a_attn is not None else 0)
            f = self.mlp(self.ln_2(x) if gpt2 else self.post_attention_layernorm(x))
            if a_mlp is None:
                return x + f
            u = {"houlsby": f, "parallel": x, "pfeiffer": x + f}[placement]
            return x + f + a_mlp(u)

        block.forward = types.MethodType(forward, block)
    return ref, params


@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("placement", PLACEMENTS)
def test_logits_and_adapter_gradients_match_the_float64_composition(arch, placement):
    model = _model(arch)
    config = fa.AdapterConfig(placement=placement, bottleneck_size=8, leave_out=[1] if placement == "pfeiffer" else [])
    fa.add_adapters(model, config, "t")
    _randomize(model, "t")
    ref, params = composition(model, "t", config)
    logits = model(IDS).logits
    want = ref(IDS).logits
    assert rel_err(logits.detach(), want.detach()) <= 1e-5
    dlogits = torch.randn(logits.shape, generator=torch.Generator().manual_seed(1))
    named = {n: p for n, p in model.named_parameters() if ".adapters." in n}
    assert set(named) == set(params) and named
    got = torch.autograd.grad(logits, list(named.values()), dlogits)
    wanted = torch.autograd.grad(want, [params[n] for n in named], dlogits.double())
    for n, a, b in zip(named, got, wanted):
        assert rel_err(a, b) <= 1e-5, n


@pytest.mark.parametrize("arch", list(ARCHS))
def test_no_active_adapter_leaves_the_model_bit_for_bit(arch):
    model = _model(arch)
    before = model(IDS).logits
    fa.add_adapters(model, fa.AdapterConfig(placement="houlsby", bottleneck_size=4), "t")
    _randomize(model, "t")
    assert not torch.equal(model(IDS).logits, before)
    fa.set_active_adapter(model, None)
    assert torch.equal(model(IDS).logits, before)


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_each_site_and_its_norm_run_as_one_op(arch):
    """With houlsby adapters everywhere, the only layer norm a forward runs itself is the
    first layer's input norm: the others come out of the site ops (Qwen3's q/k norms inside
    attention are not counted)."""
    model = _model(arch)
    fa.add_adapters(model, fa.AdapterConfig(placement="houlsby", bottleneck_size=4), "t")
    layer_norms = {id(model.model.norm)} | {
        id(n) for b in model.model.layers for n in (b.input_layernorm, b.post_attention_layernorm)
    }
    norm_cls = type(model.model.norm)
    real = norm_cls.forward

    def count():
        with mock.patch.object(norm_cls, "forward", autospec=True, side_effect=real) as calls:
            with torch.no_grad():
                model(IDS)
        return sum(id(c.args[0]) in layer_norms for c in calls.call_args_list)

    assert count() == 1
    fa.set_active_adapter(model, None)
    assert count() == 2 * 3 + 1


def test_the_handover_is_refused_for_a_changed_stream():
    """The next norm returns the site's normed output only for the tensor the site returned,
    unchanged: an in-place edit in between (a hook, say) makes it compute the norm."""
    model = _model("llama")
    fa.add_adapters(model, fa.AdapterConfig(placement="pfeiffer", bottleneck_size=4), "t")
    _randomize(model, "t")

    def bump(module, args, output):
        output.mul_(2.0)

    handle = model.model.layers[0].register_forward_hook(bump)
    got = model(IDS).logits
    handle.remove()
    ref, _ = composition(model, "t", fa.adapter_configs(model)["t"])
    ref.model.layers[0].register_forward_hook(bump)
    assert rel_err(got.detach(), ref(IDS).logits.detach()) <= 1e-5


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("placement", PLACEMENTS)
def test_generate_equals_the_eager_composition(arch, placement):
    model = _model(arch)
    config = fa.AdapterConfig(placement=placement, bottleneck_size=8)
    fa.add_adapters(model, config, "t")
    _randomize(model, "t", seed=5)
    ref, _ = composition(model, "t", config, dtype=torch.float32)
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        got = model.generate(IDS, **kw)
        want = ref.generate(IDS, **kw)
    assert torch.equal(got, want)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_routed_generation_gives_each_row_its_own_adapter(arch):
    model = _model(arch)
    for name, seed in (("a", 1), ("b", 2)):
        fa.add_adapters(model, fa.AdapterConfig(placement="houlsby", bottleneck_size=8), name)
        _randomize(model, name, seed=seed)
    ids = torch.randint(3, 97, (3, 7), generator=torch.Generator().manual_seed(4))
    kw = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    fa.set_active_adapter(model, ["a", "b"])
    with torch.no_grad(), fa.adapter_routing(model, [1, -1, 0]):
        routed = model.generate(ids, **kw)
    alone = []
    with torch.no_grad():
        for row, name in zip(ids, ("b", None, "a")):
            fa.set_active_adapter(model, name)
            alone.append(model.generate(row[None], **kw)[0])
    assert torch.equal(routed, torch.stack(alone))


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("placement", PLACEMENTS)
def test_routed_training_gives_each_row_its_own_adapter_gradients(arch, placement):
    """A routed batch (rows of two adapters and one with none): the loss's adapter gradients
    equal the sums of each row's gradients with its adapter alone."""
    model = _model(arch)
    for name, seed in (("a", 1), ("b", 2)):
        fa.add_adapters(model, fa.AdapterConfig(placement=placement, bottleneck_size=8), name)
        _randomize(model, name, seed=seed)
    ids = torch.randint(3, 97, (4, 7), generator=torch.Generator().manual_seed(5))
    route = [1, 0, -1, 1]

    def loss(logits, rows):
        return sum(F.cross_entropy(logits[i, :-1], ids[b, 1:]) for i, b in enumerate(rows))

    for b, k in enumerate(route):
        fa.set_active_adapter(model, None if k < 0 else "ab"[k])
        loss(model(input_ids=ids[b : b + 1]).logits, [b]).backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters() if ".adapters." in n and p.grad is not None}
    model.zero_grad(set_to_none=True)
    fa.set_active_adapter(model, ["a", "b"])
    with fa.adapter_routing(model, route):
        loss(model(input_ids=ids).logits, range(4)).backward()
    got = {n: p.grad for n, p in model.named_parameters() if ".adapters." in n and p.grad is not None}
    assert got.keys() == want.keys() and len(got) == (16 if placement == "houlsby" else 8) * 3  # 4 tensors a site
    for n in want:
        assert rel_err(got[n], want[n]) <= 2e-5, n


def test_gradient_checkpointing_gives_the_same_gradients():
    model = _model("llama").train()
    fa.add_adapters(model, fa.AdapterConfig(placement="houlsby", bottleneck_size=8), "t")
    _randomize(model, "t")
    fa.mark_only_adapters_trainable(model, train_head=False)

    def grads():
        model.zero_grad()
        model(IDS, labels=IDS).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    plain = grads()
    model.gradient_checkpointing_enable()
    checkpointed = grads()
    assert plain.keys() == checkpointed.keys() and plain
    for n in plain:
        assert rel_err(checkpointed[n], plain[n]) <= 1e-6, n


def test_compiled_model_matches_eager():
    torch._dynamo.reset()
    model = _model("llama")
    fa.add_adapters(model, fa.AdapterConfig(placement="houlsby", bottleneck_size=8), "t")
    _randomize(model, "t")
    with torch.no_grad():
        eager = model(IDS).logits
        compiled = torch.compile(model)(IDS).logits
    assert rel_err(compiled, eager) <= 1e-5


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_adapters_save_and_load(arch, tmp_path):
    model = _model(arch)
    fa.add_adapters(model, fa.AdapterConfig(placement="pfeiffer", bottleneck_size=6), "t")
    _randomize(model, "t")
    want = model(IDS).logits
    fa.save_adapters(model, tmp_path, name="t")
    fresh = _model(arch)
    fa.load_adapters(fresh, tmp_path)
    assert torch.equal(fresh(IDS).logits, want)


def test_adapters_live_on_the_sub_layers():
    model = _model("llama")
    fa.add_adapters(model, fa.AdapterConfig(placement="houlsby", bottleneck_size=4), "t")
    names = [n for n, _ in model.named_parameters() if ".adapters." in n]
    assert "model.layers.0.self_attn.adapters.t.down.weight" in names
    assert "model.layers.2.mlp.adapters.t.up.bias" in names
    assert len(names) == 3 * 2 * 4
    stats = fa.mark_only_adapters_trainable(model, train_head=False)
    assert stats["trainable"] == stats["adapters"]


def test_unsupported_decoders_are_refused_by_name():
    gemma = GemmaForCausalLM(GemmaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1, head_dim=16))  # fmt: skip
    with pytest.raises(ValueError, match="decoder model_type 'gemma' is not supported"):
        fa.add_adapters(gemma, fa.AdapterConfig())
    llama = _model("llama")
    llama.model.layers[1].post_attention_layernorm = torch.nn.LayerNorm(40)
    with pytest.raises(ValueError, match="LayerNorm is not an RMSNorm fastadapter knows"):
        fa.add_adapters(llama, fa.AdapterConfig())
    assert fa.adapter_configs(llama) == {}


def test_rmsnorm_eps_of_the_model_is_used():
    model = _model("llama")
    for m in model.modules():
        if isinstance(m, LlamaRMSNorm):
            m.variance_epsilon = 0.5  # large enough that a wrong eps shows
    config = fa.AdapterConfig(placement="houlsby", bottleneck_size=4)
    fa.add_adapters(model, config, "t")
    _randomize(model, "t")
    ref, _ = composition(model, "t", config)
    assert rel_err(model(IDS).logits.detach(), ref(IDS).logits.detach()) <= 1e-5
