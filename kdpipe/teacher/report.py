"""The text ``kdpipe inspect`` prints about a teacher."""

from __future__ import annotations

from kdpipe.teacher.graph import TeacherGraph
from kdpipe.teacher.modules import node_scopes
from kdpipe.teacher.taps import TapInfo, auto_taps


def _fmt_shape(shape: tuple[int | None, ...] | None) -> str:
    if shape is None:
        return "?"
    return "(" + ", ".join("batch" if d is None else str(d) for d in shape) + ")"


def transformer_lines(cands: list[TapInfo]) -> list[str]:
    """One line about a transformer teacher's blocks and tokens (none for a CNN)."""
    blocks = [c for c in cands if c.block]
    if not blocks:
        return []
    b = blocks[-1]
    c, h, w = b.shape
    extra = b.tokens - h * w
    where = f"tokens {b.token_start}..{b.token_start + h * w - 1}"
    attn = "; attention Softmax found (--targets attn)" if all(x.softmax for x in blocks) else ""
    return [
        f"transformer: {len(blocks)} blocks, {b.tokens} tokens = {extra} extra + {h}x{w} patch grid "
        f"({where}), width {c}{attn}; --taps blocks:I,J,... picks blocks (1-based)"
    ]


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
    grid = "; NLC: C,h,w of the patch grid" if any(c.layout == "NLC" for c in cands) else ""
    lines.append(f"candidate taps ({len(cands)}; * = picked by --taps auto; shape is C,H,W{grid}):")
    rows = []
    for c in cands:
        mod = c.module_path or (f"(in {inside[c.name]})" if c.name in inside else "-")
        rows.append(("*" if c.auto else " ", c.name, "x".join(map(str, c.shape)), c.layout, c.op_type, mod))
    widths = [max([len(r[i]) for r in rows] + [1]) for i in range(6)]
    for r in rows:
        lines.append("  " + "  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip())
    auto = auto_taps(graph)
    lines += transformer_lines(cands)
    if auto:
        lines.append("auto taps, by depth:")
        for i, c in enumerate(auto):
            block = f"  block {c.block}" if c.block else ""
            shape = "x".join(map(str, c.shape))
            lines.append(f"  {i}: {c.name}  {shape}  {c.layout}  {c.module_path or ''}{block}".rstrip())
    else:
        lines.append("auto taps: none found; name taps by tensor name, module path or re:PATTERN")
    return "\n".join(lines)
