"""`kdpipe doctor`: what is installed and what actually loads on this machine."""

from __future__ import annotations

import importlib.metadata as md
import os
import platform
import tempfile
from typing import Any


def _version(dist: str) -> str | None:
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return None


def _tiny_onnx_file(folder: str) -> str:
    import onnx
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "doctor", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = os.path.join(folder, "doctor.onnx")
    onnx.save(model, path)
    return path


def providers_that_load() -> dict[str, Any]:
    """Create a tiny session per listed provider and report which ones really run it.

    onnxruntime-gpu lists CUDA even where the CUDA libraries cannot load, then silently falls back to
    CPU: ``get_providers()`` of a created session is the truth, ``get_available_providers()`` is not.
    """
    import onnxruntime as ort

    ort.set_default_logger_severity(4)
    listed = list(ort.get_available_providers())
    loads: dict[str, bool] = {}
    with tempfile.TemporaryDirectory() as tmp:
        path = _tiny_onnx_file(tmp)
        for p in listed:
            if p in ("TensorrtExecutionProvider",):
                loads[p] = False  # TensorRT needs engines built per model; not used by kdpipe
                continue
            try:
                sess = ort.InferenceSession(path, providers=[p])
                loads[p] = p in sess.get_providers()
            except Exception:  # any failure to create it means it does not load
                loads[p] = False
    return {"listed": listed, "loads": loads}


def collect() -> dict[str, Any]:
    """Everything doctor reports, as a dict (printed as text by the CLI)."""
    from kdpipe import __version__, ops

    info: dict[str, Any] = {
        "kdpipe": __version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "packages": {
            name: _version(name)
            for name in (
                "torch",
                "numpy",
                "onnx",
                "onnxscript",
                "onnxruntime",
                "onnxruntime-gpu",
                "click",
                "onnx2torch",  # --targets grad only (pip install --no-deps onnx2torch==1.5.15)
            )  # fmt: skip
        },
        "native": ops.native_available(),
        "native_cuda_built": ops.cuda_available(),
        "native_threads": ops.num_threads(),
        "warnings": [],
    }
    if ops.native_available():
        from kdpipe import _native  # type: ignore[attr-defined]

        info["openmp"] = bool(getattr(_native, "openmp_max_threads", lambda: 0)())
        gpus = getattr(_native, "cuda_device_count", lambda: 0)()
        info["cuda_devices"] = gpus
    else:
        info["warnings"].append(
            "kdpipe._native did not load: ops run in NumPy (slower); reinstall with `make build`"
        )
    pk = info["packages"]
    if pk["onnxruntime"] and pk["onnxruntime-gpu"]:
        info["warnings"].append(
            "both onnxruntime and onnxruntime-gpu are installed; they share one module folder: "
            "`pip uninstall -y onnxruntime onnxruntime-gpu` then install the one you want"
        )
    try:
        info["onnxruntime_providers"] = providers_that_load()
    except ImportError:
        info["onnxruntime_providers"] = None
        info["warnings"].append("onnxruntime is not importable: `pip install kdpipe[cpu]` or `kdpipe[gpu]`")
    prov = info["onnxruntime_providers"]
    if prov and "CUDAExecutionProvider" in prov["listed"] and not prov["loads"].get("CUDAExecutionProvider"):
        info["warnings"].append(
            "onnxruntime lists CUDAExecutionProvider but it does not load here (no GPU or CUDA/cuDNN "
            "libraries missing): teachers run on CPU"
        )
    return info


def format_report(info: dict[str, Any]) -> str:
    lines = [f"kdpipe {info['kdpipe']}  python {info['python']}  {info['platform']}"]
    for name, v in info["packages"].items():
        lines.append(f"  {name:<16} {v or '-'}")
    lines.append(f"  native ops       {'loaded' if info['native'] else 'MISSING'}")
    lines.append(
        f"  native CUDA      {'built' if info['native_cuda_built'] else 'not built'}"
        f" ({info.get('cuda_devices', 0)} device(s) visible)"
    )
    lines.append(f"  threads          {info['native_threads']} (KDPIPE_NUM_THREADS, else torch)")
    prov = info["onnxruntime_providers"]
    if prov:
        loads = [p for p, ok in prov["loads"].items() if ok]
        lines.append(f"  ort listed       {', '.join(prov['listed'])}")
        lines.append(f"  ort loads        {', '.join(loads) or 'none'}")
    for w in info["warnings"]:
        lines.append(f"WARNING: {w}")
    return "\n".join(lines)
