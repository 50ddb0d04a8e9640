"""The text ``kdpipe inspect`` prints about a teacher."""

from __future__ import annotations

from kdpipe.teacher.graph import TeacherGraph
from kdpipe.teacher.modules import node_scopes
from kdpipe.teacher.taps import auto_taps


def _fmt_shape(shape: tuple[int | None, ...] | None) -> str:
    if shape is None:
        return "?"
    return "(" + ", ".join("batch" if d is None else str(d) for d in shape) + ")"


def inspect_report(graph: TeacherGraph) -> str:
    """Input, outputs, candidate taps (shape C,H,W, layout, op, module path) and the ``auto`` picks."""
    inp = graph.input
    lines = [
        f"teacher: {graph.path}",
        f"sha256:  {graph.sha256}",
        f"opset:   {graph.opset}",
        f"input:   {inp.name}  layout {inp.layout}  shape {_fmt_shape(inp.shape)}  dtype {inp.dtype}",
    ]
    if graph.batch_message:
        lines.append(f"batch:   {graph.batch_message}")
    lines.append("outputs:")
    for o in graph.model.graph.output:
        mark = "  <- logits" if o.name == graph.logits_name else ""
        lines.append(f"  {o.name}  {_fmt_shape(graph.shapes.get(o.name))}{mark}")
    cands = graph.taps_candidates()
    inside = {n.output[0]: s[-1] for n in graph.model.graph.node if n.output and (s := node_scopes(n))}
    lines.append(f"candidate taps ({len(cands)}; * = picked by --taps auto; shape is C,H,W):")
    rows = []
    for c in cands:
        mod = c.module_path or (f"(in {inside[c.name]})" if c.name in inside else "-")
        rows.append(("*" if c.auto else " ", c.name, "x".join(map(str, c.shape)), c.layout, c.op_type, mod))
    widths = [max([len(r[i]) for r in rows] + [1]) for i in range(6)]
    for r in rows:
        lines.append("  " + "  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip())
    auto = auto_taps(graph)
    if auto:
        lines.append("auto taps, by depth:")
        for i, c in enumerate(auto):
            lines.append(
                f"  {i}: {c.name}  {'x'.join(map(str, c.shape))}  {c.layout}  {c.module_path or ''}".rstrip()
            )
    else:
        lines.append("auto taps: none found; name taps by tensor name, module path or re:PATTERN")
    return "\n".join(lines)
