"""Hugging Face integration on tiny random models of each supported architecture."""

import os

import pytest
import torch
import torch.nn.functional as F
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    BertModel,
    DistilBertConfig,
    DistilBertModel,
    ElectraConfig,
    ElectraModel,
    RobertaConfig,
    RobertaModel,
    XLMRobertaConfig,
    XLMRobertaModel,
)

import fastadapter as fa

SMALL = dict(num_hidden_layers=3, num_attention_heads=2, intermediate_size=96, vocab_size=120)
ARCHS = {
    "bert": lambda: BertModel(BertConfig(hidden_size=48, **SMALL)),
    "roberta": lambda: RobertaModel(RobertaConfig(hidden_size=48, **SMALL)),
    "xlm-roberta": lambda: XLMRobertaModel(XLMRobertaConfig(hidden_size=48, **SMALL)),
    "electra": lambda: ElectraModel(ElectraConfig(hidden_size=48, embedding_size=32, **SMALL)),
    "distilbert": lambda: DistilBertModel(DistilBertConfig(dim=48, n_layers=3, n_heads=2, hidden_dim=96, vocab_size=120)),
}
BERT_STYLE = ["bert", "roberta", "xlm-roberta", "electra"]
IDS = torch.randint(5, 120, (2, 9), generator=torch.Generator().manual_seed(0))


def _model(arch):
    torch.manual_seed(0)
    return ARCHS[arch]().eval()


def _out(model):
    with torch.no_grad():
        return model(input_ids=IDS).last_hidden_state


def _randomize(model, name, seed=3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if f"adapters.{name}." in pname:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("placement,sites_per_layer,b", [("pfeiffer", 1, 3), ("houlsby", 2, 3), ("parallel", 1, 24)])
def test_expected_parameters(arch, placement, sites_per_layer, b):
    model = _model(arch)
    fa.add_adapters(model, fa.AdapterConfig(placement=placement), "t")
    params = {n: p for n, p in model.named_parameters() if ".adapters.t." in n}
    d = 48
    assert len(params) == 4 * 3 * sites_per_layer
    assert sum(p.numel() for p in params.values()) == 3 * sites_per_layer * (2 * d * b + b + d)
    assert all(n.endswith(("down.weight", "down.bias", "up.weight", "up.bias")) for n in params)


def _manual(model, name, placement, act, scaling):
    """The placement formula written out on a BERT-style model with plain torch ops."""

    def f(adapter, t):
        return F.linear(act(F.linear(t, adapter.down.weight, adapter.down.bias)), adapter.up.weight, adapter.up.bias)

    def patch(module, kind):
        adapter = module.adapters[name]

        def forward(hidden_states, input_tensor):
            h = module.dropout(module.dense(hidden_states))
            ln = module.LayerNorm
            if placement == "pfeiffer":
                return ln(h + input_tensor + scaling * f(adapter, ln(h + input_tensor)))
            if placement == "houlsby":
                return ln(h + input_tensor + scaling * f(adapter, h))
            return ln(h + input_tensor + scaling * f(adapter, input_tensor))

        return forward

    fa.set_active_adapter(model, None)
    originals = []
    for layer in model.encoder.layer:
        for module, kind in ((layer.attention.output, "attention"), (layer.output, "output")):
            if hasattr(module, "adapters") and name in module.adapters:
                originals.append((module, module.forward))
                module.forward = patch(module, kind)
    try:
        return _out(model)
    finally:
        for module, fwd in originals:
            module.forward = fwd
        fa.set_active_adapter(model, name)


@pytest.mark.parametrize("arch", BERT_STYLE)
@pytest.mark.parametrize("placement", ["pfeiffer", "houlsby", "parallel"])
def test_outputs_follow_the_placement_formula(arch, placement):
    model = _model(arch)
    config = fa.AdapterConfig(placement=placement, activation="gelu", scaling=0.7, reduction_factor=4)
    fa.add_adapters(model, config, "t")
    _randomize(model, "t")
    got = _out(model)
    want = _manual(model, "t", placement, F.gelu, 0.7)
    assert (got - _out_base(arch)).abs().max() > 1e-2
    assert (got - want).abs().max().item() <= 1e-5


def _out_base(arch):
    return _out(_model(arch))


@pytest.mark.parametrize("arch", BERT_STYLE)
@pytest.mark.parametrize("placement,sites", [("houlsby", 6), ("pfeiffer", 3), ("parallel", 3)])
def test_each_site_runs_as_one_op(arch, placement, sites):
    """With adapters a BERT-style model runs one adapter_layernorm op per site and no other
    LayerNorm there (only the embeddings' and the untouched sites' own)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = {}

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func.overloadpacket.__name__
            self.ops[name] = self.ops.get(name, 0) + 1
            return func(*args, **(kwargs or {}))

    model = _model(arch)
    with Count() as base:
        _out(model)
    fa.add_adapters(model, fa.AdapterConfig(placement=placement, reduction_factor=4), "t")
    with Count() as fused:
        _out(model)
    assert fused.ops.get("adapter_layernorm_forward") == sites
    assert fused.ops.get("native_layer_norm", 0) == base.ops["native_layer_norm"] - sites
    assert "adapter_forward" not in fused.ops


@pytest.mark.parametrize("arch", list(ARCHS))
def test_switching_and_no_active_adapter(arch):
    model = _model(arch)
    untouched = _out(model)
    fa.add_adapters(model, fa.AdapterConfig(placement="houlsby", reduction_factor=4), "a")
    fa.add_adapters(model, fa.AdapterConfig(placement="parallel", reduction_factor=4), "b")
    _randomize(model, "a", 1)
    _randomize(model, "b", 2)
    assert fa.active_adapter(model) == "b"
    out_b = _out(model)
    fa.set_active_adapter(model, "a")
    out_a = _out(model)
    fa.set_active_adapter(model, None)
    assert torch.equal(_out(model), untouched)
    # each equals a model that only has that adapter
    for name, out in (("a", out_a), ("b", out_b)):
        single = _model(arch)
        fa.add_adapters(single, fa.adapter_configs(model)[name], name)
        single.load_state_dict(model.state_dict(), strict=False)
        assert torch.equal(_out(single), out)
    assert (out_a - out_b).abs().max() > 1e-2
    fa.remove_adapter(model, "a")
    assert fa.active_adapter(model) is None
    assert not any(".adapters.a." in n for n, _ in model.named_parameters())
    fa.set_active_adapter(model, "b")
    assert torch.equal(_out(model), out_b)


def test_leave_out_and_per_layer_reduction():
    model = _model("bert")
    fa.add_adapters(model, fa.AdapterConfig(placement="pfeiffer", reduction_factor={"default": 4, 2: 16}, leave_out=[1]), "t")
    layers = model.encoder.layer
    assert layers[0].output.adapters["t"].bottleneck_size == 12
    assert not hasattr(layers[1].output, "adapters") or "t" not in layers[1].output.adapters
    assert layers[2].output.adapters["t"].bottleneck_size == 3


def test_bad_calls_say_what_is_wrong():
    with pytest.raises(ValueError, match="found no transformer layers fastadapter knows in Sequential: looked for"):
        fa.add_adapters(torch.nn.Sequential(torch.nn.Linear(4, 4)), fa.AdapterConfig())
    model = _model("bert")
    fa.add_adapters(model, fa.AdapterConfig(), "t")
    with pytest.raises(ValueError, match="already has an adapter named 't'"):
        fa.add_adapters(model, fa.AdapterConfig(), "t")
    with pytest.raises(ValueError, match="leave_out names layers \\[7\\]"):
        fa.add_adapters(model, fa.AdapterConfig(leave_out=[7]), "u")
    assert list(fa.adapter_configs(model)) == ["t"]
    with pytest.raises(ValueError, match="unknown placement 'serial'"):
        fa.AdapterConfig(placement="serial")
    with pytest.raises(ValueError, match="no adapter named 'zz'"):
        fa.set_active_adapter(model, "zz")
    with pytest.raises(ValueError, match="identifier"):
        fa.add_adapters(model, fa.AdapterConfig(), "a.b")
    assert fa.AdapterConfig(placement="double_seq_bn").activation == "silu"
    assert fa.AdapterConfig(placement="par_bn").scaling == 4.0


def test_mark_only_adapters_trainable_keeps_the_head():
    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(hidden_size=48, num_labels=3, **SMALL))
    fa.add_adapters(model, fa.AdapterConfig(placement="houlsby"), "t")
    counts = fa.mark_only_adapters_trainable(model, train_head=True)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n in dict(model.named_parameters()) if ".adapters." in n or n.startswith("classifier.")}
    head = sum(p.numel() for n, p in model.named_parameters() if n.startswith("classifier."))
    assert counts["trainable"] == counts["adapters"] + head
    assert counts["total"] == sum(p.numel() for p in model.parameters())
    counts = fa.mark_only_adapters_trainable(model, train_head=False)
    assert counts["trainable"] == counts["adapters"]


@pytest.mark.parametrize("arch", ["bert", "distilbert"])
def test_adapter_checkpoint_round_trip(arch, tmp_path):
    model = _model(arch)
    fa.add_adapters(model, fa.AdapterConfig(placement="houlsby", reduction_factor=4, scaling=2.0), "a")
    fa.add_adapters(model, fa.AdapterConfig(placement="pfeiffer", bottleneck_size=5), "b")
    _randomize(model, "a", 1)
    _randomize(model, "b", 2)
    want_b = _out(model)
    fa.set_active_adapter(model, "a")
    want_a = _out(model)
    fa.save_adapters(model, str(tmp_path))
    size = sum(os.path.getsize(tmp_path / f) for f in os.listdir(tmp_path))
    assert size < 50_000  # adapters only, never the base model
    fresh = _model(arch)
    assert fa.load_adapters(fresh, str(tmp_path)) == ["a", "b"]
    assert torch.equal(_out(fresh), want_b)
    fa.set_active_adapter(fresh, "a")
    assert torch.equal(_out(fresh), want_a)
    only = _model(arch)
    fa.load_adapters(only, str(tmp_path), name="a")
    assert list(fa.adapter_configs(only)) == ["a"]


def test_mismatched_checkpoint_loads_nothing(tmp_path):
    model = _model("bert")
    fa.add_adapters(model, fa.AdapterConfig(), "a")
    fa.save_adapters(model, str(tmp_path))
    other = BertModel(BertConfig(hidden_size=64, **SMALL))
    with pytest.raises(ValueError, match="hidden_size=48.*has 64"):
        fa.load_adapters(other, str(tmp_path))
    assert not fa.adapter_configs(other)
    distil = _model("distilbert")
    with pytest.raises(ValueError, match="model_type='bert'"):
        fa.load_adapters(distil, str(tmp_path))
    assert not any(".adapters." in n for n, _ in distil.named_parameters())


def test_gradient_checkpointing_gives_the_same_gradients():
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = BertModel(BertConfig(hidden_size=48, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, **SMALL))
        fa.add_adapters(model, fa.AdapterConfig(placement="houlsby", reduction_factor=4), "t")
        _randomize(model, "t")
        fa.mark_only_adapters_trainable(model)
        model.train()
        if checkpointing:
            model.gradient_checkpointing_enable()
        model(input_ids=IDS).last_hidden_state.square().mean().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], rtol=1e-5, atol=1e-7)


def test_trainer_trains_only_the_adapters(tmp_path):
    from torch.utils.data import Dataset
    from transformers import Trainer, TrainingArguments

    class Toy(Dataset):
        def __len__(self):
            return 32

        def __getitem__(self, i):
            g = torch.Generator().manual_seed(i)
            ids = torch.randint(5, 120, (9,), generator=g)
            return {"input_ids": ids, "labels": int(ids[0] % 2)}

    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(hidden_size=48, num_labels=2, **SMALL))
    fa.add_adapters(model, fa.AdapterConfig(placement="pfeiffer", reduction_factor=4), "t")
    fa.mark_only_adapters_trainable(model)
    frozen = model.bert.embeddings.word_embeddings.weight.clone()
    before = {n: p.clone() for n, p in model.named_parameters() if ".adapters." in n}
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=8, learning_rate=1e-2,
        report_to=[], save_strategy="no", use_cpu=True, logging_steps=1,
    )  # fmt: skip
    result = Trainer(model=model, args=args, train_dataset=Toy()).train()
    assert result.global_step == 4
    assert torch.equal(model.bert.embeddings.word_embeddings.weight, frozen)
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters() if n in before)


@pytest.mark.parametrize("arch", ["bert", "distilbert"])
def test_deepcopy_and_pickle_keep_adapters_apart(arch):
    import copy
    import pickle

    model = _model(arch)
    for placement in ("houlsby", "pfeiffer", "parallel"):
        fa.add_adapters(model, fa.AdapterConfig(placement=placement, reduction_factor=4), placement)
        _randomize(model, placement)
    outs = {}
    for placement in ("houlsby", "pfeiffer", "parallel"):
        fa.set_active_adapter(model, placement)
        outs[placement] = _out(model)
    twin = copy.deepcopy(model)
    restored = pickle.loads(pickle.dumps(model))
    for placement, want in outs.items():
        fa.set_active_adapter(twin, placement)
        fa.set_active_adapter(restored, placement)
        assert torch.equal(_out(twin), want) and torch.equal(_out(restored), want)
        _randomize(twin, placement, seed=99)  # the copy's own adapters, not the original's
        fa.set_active_adapter(model, placement)
        assert torch.equal(_out(model), want)
        assert not torch.equal(_out(twin), want)


def test_compiled_model_with_adapters_has_no_graph_break():
    model = _model("bert")
    fa.add_adapters(model, fa.AdapterConfig(placement="houlsby", reduction_factor=4), "t")
    _randomize(model, "t")
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(model)(input_ids=IDS)
    assert explanation.graph_count == 1 and explanation.graph_break_count == 0
    with torch.no_grad():
        got = torch.compile(model)(input_ids=IDS).last_hidden_state
    assert (got - _out(model)).abs().max().item() <= 1e-5


def test_bottleneck_sizes_follow_adapterhub():
    config = fa.AdapterConfig(reduction_factor={"default": 16, "1": 5})
    assert config.bottleneck_for(0, 384) == 24 and config.bottleneck_for(1, 384) == 76
    assert fa.AdapterConfig(reduction_factor=1000).bottleneck_for(0, 48) == 1  # clamped to 1, as AdapterHub does
    assert fa.AdapterConfig(bottleneck_size=7).bottleneck_for(3, 48) == 7
    with pytest.raises(ValueError, match="reduction_factor or bottleneck_size, not both"):
        fa.AdapterConfig(reduction_factor=4, bottleneck_size=7)
    with pytest.raises(ValueError, match="reduction_factor must be a positive number"):
        fa.AdapterConfig(reduction_factor=0)
    restored = fa.AdapterConfig.from_dict(config.to_dict())
    assert restored == config


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_bf16_bert_on_gpu_matches_reference(backend):
    """A bf16 BERT with adapters on CUDA: each GPU backend against the reference, and a training step."""
    model = _model("bert").to("cuda", torch.bfloat16)
    fa.add_adapters(model, fa.AdapterConfig(placement="houlsby", reduction_factor=4, backend=backend), "t")
    fa.add_adapters(model, fa.AdapterConfig(placement="houlsby", reduction_factor=4, backend="reference"), "ref")
    _randomize(model, "t")
    same = {k.replace(".adapters.t.", ".adapters.ref."): v for k, v in model.state_dict().items() if ".adapters.t." in k}
    model.load_state_dict(same, strict=False)
    ids = IDS.to("cuda")
    outs = {}
    for name in ("t", "ref"):
        fa.set_active_adapter(model, name)
        with torch.no_grad():
            outs[name] = model(input_ids=ids).last_hidden_state.float()
    assert (outs["t"] - outs["ref"]).norm() <= 2e-2 * outs["ref"].norm()
    fa.set_active_adapter(model, "t")
    fa.mark_only_adapters_trainable(model)
    model.train()
    model(input_ids=ids).last_hidden_state.float().square().mean().backward()
    grads = [p.grad for n, p in model.named_parameters() if ".adapters.t." in n]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)


def _corrupt(weights: dict, key: str, fault: str) -> str:
    """One fault in a checkpoint's weights: ``key`` one column short, left out, or joined by a
    stray entry beside it. Returns what the load's error must say."""
    if fault == "shape":
        weights[key] = weights[key][..., :-1].contiguous()
        return f"{key} has shape"
    if fault == "missing":
        del weights[key]
        return "missing"
    weights[key.replace(".weight", ".stray")] = weights[key].clone()
    return "unexpected"


FAULTS = ["shape", "missing", "unexpected"]


@pytest.mark.parametrize("fault", FAULTS)
@pytest.mark.parametrize("what", ["adapter", "fusion"])
def test_checkpoint_with_wrong_weights_loads_nothing(what, fault, tmp_path):
    """A saved weight of the wrong shape, a missing one or a stray one: the load says which,
    and the model is left without anything from the checkpoint (adapters nor fusion layer)."""
    import re

    from safetensors.torch import load_file, save_file

    model = _model("bert")
    fa.add_adapters(model, fa.AdapterConfig(), "a")
    fa.add_adapters(model, fa.AdapterConfig(), "b")
    fa.add_fusion(model, ["a", "b"])
    fa.save_adapters(model, str(tmp_path))
    path = str(tmp_path / "adapters.safetensors")
    weights = load_file(path)
    part = ".adapters.b.up." if what == "adapter" else ".adapter_fusion_layer.a,b.value."
    key = sorted(k for k in weights if part in k and k.endswith(".weight"))[-1]
    says = _corrupt(weights, key, fault)
    save_file(weights, path)
    fresh = _model("bert")
    before = set(dict(fresh.named_parameters()))
    with pytest.raises(ValueError, match=re.escape(says)):
        fa.load_adapters(fresh, str(tmp_path))
    assert set(dict(fresh.named_parameters())) == before
    assert not fa.adapter_configs(fresh) and not fa.fusion_configs(fresh)


@pytest.mark.parametrize("fault", FAULTS)
def test_adapterhub_checkpoint_with_wrong_weights_loads_nothing(fault, tmp_path):
    """The same for an AdapterHub directory."""
    import re

    model = _model("bert")
    fa.add_adapters(model, fa.AdapterConfig(), "a")
    fa.save_adapterhub(model, str(tmp_path), "a")
    path = str(tmp_path / "pytorch_adapter.bin")
    weights = torch.load(path, weights_only=True)
    key = sorted(k for k in weights if k.endswith(".weight"))[-1]
    says = {"shape": _corrupt(weights, key, fault), "missing": "lacks 1 of", "unexpected": "unexpected parameter"}[fault]
    torch.save(weights, path)
    fresh = _model("bert")
    before = set(dict(fresh.named_parameters()))
    with pytest.raises(ValueError, match=re.escape(says)):
        fa.load_adapterhub(fresh, str(tmp_path))
    assert set(dict(fresh.named_parameters())) == before and not fa.adapter_configs(fresh)
