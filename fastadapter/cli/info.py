"""``fastadapter info``: what this library sees on this machine, for bug reports and scripts."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import re
import sys
from typing import Any, Optional

OPS = ("adapter", "adapter_layernorm", "adapter_rmsnorm", "mixed_adapter")  # the registered ops, for their backends


def _version(package: str) -> Optional[str]:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def cpu() -> dict[str, Any]:
    """Vendor, model name and the vector features the cpp backend cares about, from the OS."""
    info: dict[str, Any] = {"machine": platform.machine(), "cores": os.cpu_count()}
    text = ""
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read()
    except OSError:
        info["model"] = platform.processor() or None
    for key, field in (("vendor_id", "vendor"), ("model name", "model"), ("cpu family", "family"), ("model", "model_number")):
        m = re.search(rf"^{key}\s*:\s*(.+)$", text, re.M)
        if m:
            info[field] = m.group(1).strip()
    m = re.search(r"^(?:flags|Features)\s*:\s*(.+)$", text, re.M)
    flags = set(m.group(1).split()) if m else set()
    info["features"] = {
        "avx2": "avx2" in flags,
        "avx512f": "avx512f" in flags,
        "avx512_bf16": "avx512_bf16" in flags,
        "amx": "amx_tile" in flags,
    }
    return info


def gpu() -> dict[str, Any]:
    import torch

    if not torch.cuda.is_available():
        why = "torch was built without CUDA" if torch.version.cuda is None else "no CUDA device is visible"
        return {"available": False, "reason": why}
    out = {"available": True, "devices": []}
    for i in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(i)
        out["devices"].append(
            {
                "name": props.name,
                "capability": f"sm_{props.major}{props.minor}",
                "memory_gib": round(props.total_memory / 2**30, 1),
                "sms": props.multi_processor_count,
            }
        )
    return out


def extension() -> dict[str, Any]:
    """Whether the C++ extension is built (building it if needed, as first use would) and where."""
    from ..backends import extension as ext

    module, reason = ext.load()
    out: dict[str, Any] = {"built": module is not None, "reason": reason}
    if module is not None:
        out["path"] = getattr(module, "__file__", None)
        out["cuda"] = bool(getattr(module, "with_cuda", False))
        if hasattr(module, "avx512_kernels"):
            out["avx512_kernels"] = bool(module.avx512_kernels()[0])
        if hasattr(module, "avx2_kernels"):
            out["avx2_kernels"] = bool(module.avx2_kernels()[0])
    out["cache_dir"] = os.path.dirname(str(ext.build_dir("fastadapter_C")))
    return out


def collect() -> dict[str, Any]:
    import torch

    import fastadapter

    from .. import backends

    return {
        "fastadapter": fastadapter.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": _version("triton"),
        "transformers": _version("transformers"),
        "adapters (AdapterHub)": _version("adapters"),
        "cpu": cpu(),
        "threads": torch.get_num_threads(),
        "gpu": gpu(),
        "backends": backends.available_backends(),
        "ops": {op: backends.available_backends(op) for op in OPS},
        "extension": extension(),
        "env": {k: v for k, v in os.environ.items() if k.startswith(("FASTADAPTER_", "TRITON_INTERPRET"))},
    }


def format_report(info: dict[str, Any]) -> str:
    c, g, e = info["cpu"], info["gpu"], info["extension"]
    feats = ", ".join(k for k, v in c["features"].items() if v) or "none of avx2/avx512/amx"
    lines = [
        f"fastadapter {info['fastadapter']}",
        f"python {info['python']} on {info['platform']}",
        f"torch {info['torch']} (cuda {info['torch_cuda'] or 'none'}), triton {info['triton'] or 'not installed'}, "
        f"transformers {info['transformers'] or 'not installed'}"
        + (f", adapters {info['adapters (AdapterHub)']}" if info["adapters (AdapterHub)"] else ""),
        f"cpu: {c.get('vendor', '?')} {c.get('model', '?')} (family {c.get('family', '?')} model {c.get('model_number', '?')}), "
        f"{c['cores']} cores, {info['threads']} torch threads; features: {feats}",
    ]
    if g["available"]:
        for i, dev in enumerate(g["devices"]):
            lines.append(f"gpu {i}: {dev['name']} ({dev['capability']}, {dev['sms']} SMs, {dev['memory_gib']} GiB)")
    else:
        lines.append(f"gpu: none ({g['reason']})")
    lines.append("backends:")
    for name, reason in info["backends"].items():
        lines.append(f"  {name:10s} {'available' if reason is None else 'unavailable: ' + reason}")
    lines.append("ops (the backends that run each here):")
    for op, reasons in info["ops"].items():
        lines.append(f"  {op:18s} {', '.join(n for n, why in reasons.items() if why is None) or 'none'}")
    if e["built"]:
        kind = "CPU + CUDA" if e.get("cuda") else "CPU"
        if "avx512_kernels" not in e:
            avx = ""
        elif e["avx512_kernels"]:
            avx = ", its AVX-512 kernels in use"
        elif e.get("avx2_kernels"):
            avx = ", its AVX2 kernels in use (not the AVX-512 ones)"
        else:
            why = "turned off" if c["features"]["avx512f"] or c["features"]["avx2"] else "no AVX2 here"
            avx = f", its AVX-512 and AVX2 kernels not in use ({why}: ATen and MKL)"
        lines.append(f"extension: built ({kind}{avx}) at {e['path']}")
    else:
        lines.append(f"extension: not built ({e['reason']})")
    lines.append(f"extension cache: {e['cache_dir']} (FASTADAPTER_EXT_DIR moves it)")
    if info["env"]:
        lines.append("environment: " + ", ".join(f"{k}={v}" for k, v in info["env"].items()))
    return "\n".join(lines)


def main(json_out: bool = False) -> int:
    info = collect()
    if json_out:
        import json

        json.dump(info, sys.stdout, indent=2, default=str)
        print()
    else:
        print(format_report(info))
    return 0
