"""Torch module paths of ONNX nodes, for taps named like ``layer2`` or ``layer2.1.relu``.

Two sources: the dynamo exporter stores ``pkg.torch.onnx.name_scopes`` in each node's metadata, a
Python list literal such as ``['', 'layer1', 'layer1.0', 'layer1.0.relu', 'relu_1']`` (root scope,
module paths from outer to inner, then the FX node name); the legacy exporter (``dynamo=False``)
names nodes ``/layer1/layer1.0/relu/Relu``, whose components are either a full path (``layer1.0``)
or an attribute name relative to the parent (``relu``) and end with the op name.
"""

from __future__ import annotations

import ast
import re

import onnx

SCOPES_KEY = "pkg.torch.onnx.name_scopes"
_CALL_SUFFIX = re.compile(r"^(.*)_(\d+)$")


def _dynamo_scopes(node: onnx.NodeProto) -> list[str] | None:
    for prop in node.metadata_props:
        if prop.key == SCOPES_KEY:
            try:
                value = ast.literal_eval(prop.value)
            except (ValueError, SyntaxError):
                return None
            if not isinstance(value, list):
                return None
            return [str(s) for s in value[:-1] if s]
    return None


def _legacy_scopes(node: onnx.NodeProto) -> list[str]:
    if not node.name.startswith("/"):
        return []
    parts = [p for p in node.name.split("/")[1:-1] if p]
    paths: list[str] = []
    for p in parts:
        if not paths:
            paths.append(p)
        elif p.startswith(paths[-1] + "."):
            paths.append(p)
        else:
            paths.append(f"{paths[-1]}.{p}")
    return paths


def node_scopes(node: onnx.NodeProto) -> list[str]:
    """Module paths enclosing ``node``, outermost first (empty when the exporter recorded none)."""
    scopes = _dynamo_scopes(node)
    return scopes if scopes is not None else _legacy_scopes(node)


def module_outputs(model: onnx.ModelProto) -> dict[str, str]:
    """Module path -> the tensor that module returns (first output of its last node in graph order).

    The legacy exporter suffixes repeated calls of one module (``relu_1``); such a path is merged into
    the un-suffixed one when that exists, so the path names the output of the module's last call.
    """
    out: dict[str, str] = {}
    for node in model.graph.node:
        if not node.output:
            continue
        for path in node_scopes(node):
            out[path] = node.output[0]
    for path in list(out):
        m = _CALL_SUFFIX.match(path)
        if m and m.group(1) in out:
            out[m.group(1)] = out.pop(path)
    return out


def tensor_modules(model: onnx.ModelProto) -> dict[str, str]:
    """Tensor -> the outermost module path whose output it is."""
    best: dict[str, str] = {}
    for path, tensor in module_outputs(model).items():
        if tensor not in best or path.count(".") < best[tensor].count("."):
            best[tensor] = path
    return best
