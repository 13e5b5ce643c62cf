"""Memory that adapters cost a training step, measured rather than estimated.

Two measures, the same for every provider so that the comparison is fair:

- **saved for the backward**: the bytes of every tensor autograd keeps for the backward
  (``torch.autograd.graph.saved_tensors_hooks``), each storage once, parameters left out
  (they exist whether or not anything is saved);
- **peak of the step**: the most bytes the CPU allocator holds during the step above what
  it held when the step began, from the allocation and free events that
  ``torch.profiler`` records with ``profile_memory=True``.

Per adapter call (x of N x d): the fused op (x and z saved), the same math in eager PyTorch
(two Linear layers, the activation, the residual add), and AdapterHub's bottleneck layer
where the ``adapters`` package is importable. Per training step of a BERT-base-shaped
model (12 layers, hidden 768, random weights) with Houlsby adapters: fastadapter, the
same adapters run as eager PyTorch modules, AdapterHub's ``double_seq_bn`` (in an
environment with ``adapters``), and the floor: no adapters, the base frozen, the backward
still running through every layer. The adapters' share is the difference to the floor.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..activations import act
from ..modules import FusedAdapter


def saved_bytes(fn: Callable[[], object], exclude: Iterator[torch.Tensor] = ()) -> tuple[int, object]:
    """(bytes autograd saves for the backward while ``fn`` runs, fn's result). Each storage
    counts once; storages of the ``exclude`` tensors (the parameters) not at all."""
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    seen: dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        ptr = st.data_ptr()
        if ptr not in skip and st.nbytes():
            seen[ptr] = max(seen.get(ptr, 0), st.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return sum(seen.values()), out


def peak_bytes(fn: Callable[[], object]) -> int:
    """Peak CPU-allocator bytes held while ``fn`` runs, above what was held when it began."""
    from torch.profiler import ProfilerActivity, profile

    with _quiet_profiler(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    try:
        events = [(e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    except AttributeError as exc:  # a torch whose profiler keeps its events elsewhere
        raise RuntimeError(f"this torch's profiler does not expose its memory events: {exc}") from None
    live = peak = 0
    for _, nbytes in sorted(events):
        live += nbytes
        peak = max(peak, live)
    return peak


@contextlib.contextmanager
def _quiet_profiler() -> Iterator[None]:
    """The profiler library writes a line to stderr (fd 2) when it starts and stops; keep
    those out of the output and pass on anything else written meanwhile."""
    import os
    import sys
    import tempfile

    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            for line in tmp.read().decode(errors="replace").splitlines():
                if not line.startswith("USDT:"):
                    print(line, file=sys.stderr)


# ----------------------------------------------------------------------------- one adapter call


def eager_adapter_forward(module: FusedAdapter, x: torch.Tensor, residual=True) -> torch.Tensor:
    """FusedAdapter's math as plain eager PyTorch ops (what a hand-written adapter module runs)."""
    u = F.linear(act(F.linear(x, module.down.weight, module.down.bias), module.activation), module.up.weight, module.up.bias)
    if module.scaling != 1.0:
        u = u * module.scaling
    if residual is True:
        return x + u
    if residual is False:
        return u
    return residual + u


def eager_site(h, r, w_down, b_down, w_up, b_up, ln_weight, ln_bias, *, placement, eps, activation, scaling, backend=None):
    """fastadapter.adapter_layernorm's math as plain eager PyTorch ops (backend is ignored)."""
    d = h.shape[-1]

    def f(u):
        v = F.linear(act(F.linear(u, w_down, b_down), activation), w_up, b_up)
        return v if scaling == 1.0 else scaling * v

    if placement == "pfeiffer":
        t = h + r
        return F.layer_norm(t + f(F.layer_norm(t, (d,), ln_weight, ln_bias, eps)), (d,), ln_weight, ln_bias, eps)
    return F.layer_norm(h + r + f(h if placement == "houlsby" else r), (d,), ln_weight, ln_bias, eps)


@contextlib.contextmanager
def eager_adapters() -> Iterator[None]:
    """Within the block every FusedAdapter, and every adapter site of a Hugging Face model,
    runs as eager PyTorch ops."""
    from ..hf import model as hf_model

    saved = FusedAdapter.forward, hf_model.adapter_layernorm
    FusedAdapter.forward, hf_model.adapter_layernorm = eager_adapter_forward, eager_site
    try:
        yield
    finally:
        FusedAdapter.forward, hf_model.adapter_layernorm = saved


def per_call(n: int = 4096, d: int = 768, r: int = 64, dtype=torch.float32, activation: str = "gelu") -> list[dict]:
    """Bytes saved for the backward and the step's peak, per adapter call, for each provider."""
    torch.manual_seed(0)
    adapter = FusedAdapter(d, r, activation=activation, dtype=dtype)
    params = list(adapter.parameters())
    x = torch.randn(n, d, dtype=dtype, requires_grad=True)
    runs: dict[str, Callable[[], torch.Tensor]] = {
        "fastadapter": lambda: adapter(x),
        "eager": lambda: eager_adapter_forward(adapter, x),
    }
    hub = _adapterhub_layer(d, r, activation, dtype)
    if hub is not None:
        params += list(hub.parameters())
        runs["adapterhub"] = lambda: hub(x, residual_input=x)[0]
    out = []
    for name, fn in runs.items():
        saved, _ = saved_bytes(fn, exclude=params)
        peak = peak_bytes(lambda fn=fn: fn().sum().backward())
        dt = str(dtype).replace("torch.", "")
        out.append({"provider": name, "N": n, "d": d, "r": r, "dtype": dt, "saved": saved, "peak": peak})
    return out


def _adapterhub_layer(d, r, activation, dtype) -> Optional[nn.Module]:
    try:
        from adapters import SeqBnConfig
        from adapters.methods.modeling import Adapter
    except ImportError:
        return None
    torch.manual_seed(0)
    layer = Adapter("a", input_size=d, down_sample=r, config=SeqBnConfig(non_linearity=activation, reduction_factor=d / r))
    return layer.to(dtype).train()


# ----------------------------------------------------------------------------- a training step


def bert_base_config(layers: int = 12, hidden: int = 768, heads: int = 12, vocab: int = 1000):
    from transformers import BertConfig

    return BertConfig(
        hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads, intermediate_size=4 * hidden,
        vocab_size=vocab, max_position_embeddings=512, num_labels=2,
    )  # fmt: skip


def build(provider: str, config) -> nn.Module:
    """A BertForSequenceClassification with random weights and what ``provider`` adds to it."""
    from transformers import BertForSequenceClassification

    import fastadapter as fa

    torch.manual_seed(0)
    model = BertForSequenceClassification(config)
    if provider in ("fastadapter", "eager"):
        fa.add_adapters(model, fa.AdapterConfig(placement="houlsby"), "t")
        fa.mark_only_adapters_trainable(model)
    elif provider == "adapterhub":
        import adapters

        adapters.init(model)
        model.add_adapter("t", config=adapters.DoubleSeqBnConfig())
        model.train_adapter("t")
        for p in model.classifier.parameters():
            p.requires_grad_(True)
    elif provider == "floor":
        fa.mark_only_adapters_trainable(model)  # no adapters: the head trains, the backward runs through every layer
        model.bert.embeddings.register_forward_hook(lambda m, a, out: out.requires_grad_())
    else:
        raise ValueError(f"unknown provider {provider!r}; expected fastadapter, eager, adapterhub or floor")
    return model.train()


def train_step(provider: str, config=None, batch: int = 32, seq: int = 128) -> dict:
    """Saved bytes and peak bytes of one forward + loss + backward of ``provider``'s model.
    Dropout is off, so that every provider computes the same thing."""
    config = config or bert_base_config()
    config.hidden_dropout_prob = config.attention_probs_dropout_prob = 0.0
    model = build(provider, config)
    params = list(model.parameters())
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, config.vocab_size, (batch, seq), generator=g)
    labels = torch.randint(0, 2, (batch,), generator=g)
    context = eager_adapters() if provider == "eager" else contextlib.nullcontext()
    with context:
        saved, loss = saved_bytes(lambda: model(input_ids=ids, labels=labels).loss, exclude=params)
        loss.backward()
        model.zero_grad(set_to_none=True)
        peak = peak_bytes(lambda: model(input_ids=ids, labels=labels).loss.backward())
    return {"provider": provider, "batch": batch, "seq": seq, "layers": config.num_hidden_layers,
            "hidden": config.hidden_size, "saved": saved, "peak": peak}  # fmt: skip


def available_step_providers() -> list[str]:
    names = ["floor", "fastadapter", "eager"]
    try:
        import adapters  # noqa: F401

        names.append("adapterhub")
    except ImportError:
        pass
    return names


def markdown(calls: list[dict], steps: list[dict]) -> str:
    mb = 2**20
    out = []
    if calls:
        c0 = calls[0]
        out += [
            f"Per adapter call (N={c0['N']}, d={c0['d']}, r={c0['r']}, {c0['dtype']}, forward + backward):",
            "",
            "| provider | saved for backward MiB | vs fastadapter | peak of the step MiB |",
            "|---|---|---|---|",
        ]
        base = next((c["saved"] for c in calls if c["provider"] == "fastadapter"), None)
        for c in calls:
            ratio = f"{c['saved'] / base:.2f}x" if base else ""
            out.append(f"| {c['provider']} | {c['saved'] / mb:.1f} | {ratio} | {c['peak'] / mb:.1f} |")
    if steps:
        s0 = steps[0]
        floor = next((s for s in steps if s["provider"] == "floor"), None)
        out += [
            "",
            f"Training step, BERT-base shape ({s0['layers']} layers, hidden {s0['hidden']}, random weights), "
            f"Houlsby adapters, batch {s0['batch']} x {s0['seq']}, fp32, dropout off:",
            "",
            "| provider | saved for backward MiB | adapters' share of it (vs floor) | peak of the step MiB | peak vs floor |",
            "|---|---|---|---|---|",
        ]
        for s in steps:
            share = peak = ""
            if floor is not None and s is not floor:
                extra = s["saved"] - floor["saved"]
                share = f"{extra / mb:.0f} MiB ({100 * extra / s['saved']:.1f}%)"
                peak = f"{s['peak'] / floor['peak']:.3f}x"
            out.append(f"| {s['provider']} | {s['saved'] / mb:.0f} | {share} | {s['peak'] / mb:.0f} | {peak} |")
    return "\n".join(out)
