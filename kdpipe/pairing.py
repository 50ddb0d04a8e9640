"""Which student taps pair with which teacher taps when their counts differ (transformer teachers or
students), and the ``--teacher-taps`` choice among a cache's taps.

Default: all taps of the side with fewer taps, paired in order with as many taps of the other side,
evenly spaced and ending at its last (a ViT's 12 blocks against a ResNet's 3 stages: blocks 4, 8, 12).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from kdpipe.errors import KdpipeError


def evenly_spaced(count: int, k: int) -> list[int]:
    """``k`` of ``count`` indices (0-based), evenly spaced, ending at the last: (j+1)*count/k rounded
    to the nearest integer, halves up (not Python's round-half-even), minus 1; in integers, exactly."""
    return [(2 * (j + 1) * count + k) // (2 * k) - 1 for j in range(k)]


def pair_indices(n_student: int, n_teacher: int) -> tuple[list[int], list[int]]:
    """(student tap indices, teacher tap indices), paired in order (module docstring)."""
    k = min(n_student, n_teacher)
    s = evenly_spaced(n_student, k) if n_student > k else list(range(k))
    t = evenly_spaced(n_teacher, k) if n_teacher > k else list(range(k))
    return s, t


def _describe(taps: Sequence[dict[str, Any]]) -> str:
    return ", ".join(f"{i}: {t.get('name')}" + (f" (block {t['block']})" if t.get("block") else "")
                     for i, t in enumerate(taps))  # fmt: skip


def select_cached(taps: Sequence[dict[str, Any]], spec: str | Sequence[str], where: str) -> list[int]:
    """Indices of the cached teacher taps named by ``--teacher-taps``: tap indices (``0,2,4``),
    ``blocks:I,J`` (1-based transformer block numbers among the cached taps), or tensor names / torch
    module paths of cached taps."""
    from kdpipe.teacher.vit_taps import group_items, is_int, parse_blocks

    items = [s.strip() for s in (spec.split(",") if isinstance(spec, str) else spec) if s.strip()]
    if not items:  # an empty choice would pair no taps at all, and AT/DCT would train on nothing
        raise KdpipeError(
            f"--teacher-taps {spec!r} names no taps; give tap indices, blocks:I,J or names of the cached "
            f"taps ({_describe(taps)}), or leave it at auto"
        )
    blocks = {int(t["block"]): i for i, t in enumerate(taps) if t.get("block")}
    out: list[int] = []
    for item in group_items(items):
        if is_int(item) and -len(taps) <= int(item) < len(taps):
            out.append(int(item) % len(taps))
        elif item == "blocks" or item.startswith("blocks:"):
            numbers = parse_blocks(item, max(blocks, default=0), where)
            missing = [n for n in numbers if n not in blocks]
            if missing:
                raise KdpipeError(
                    f"--teacher-taps {item!r}: block(s) {missing} are not cached in {where} "
                    f"(cached: {_describe(taps)}); re-run cache-teacher with them"
                )
            out += [blocks[n] for n in numbers]
        else:
            hits = [i for i, t in enumerate(taps) if item in (t.get("name"), t.get("module_path"))]
            if not hits:
                raise KdpipeError(
                    f"--teacher-taps {item!r} is not a tap of {where}; give tap indices, "
                    f"blocks:I,J or names of the cached taps ({_describe(taps)})"
                )
            out.append(hits[0])
    return out
