"""Which cached arrays a method reads, and the teacher targets derived from them instead of stored.

Derived, not stored (docs/methods.md): the DCT target of a map is invariant to the map's positive
scale, so ``D(at) == D(mean_c(F**2))`` exactly in exact arithmetic; from the cached (float16) at map
it is within float16 rounding of the stored D. A cache made with ``--targets ...,dct`` keeps its
stored D arrays, and they are used as they are.

Top-K logits (``cache-teacher --logits topk:K``) are stored as ``logits.topk`` (K values, largest
first), ``logits.topk_index`` (their classes) and ``logits.rest`` (the mean of the other C-K logits).
Distill rebuilds dense teacher logits from them: the K stored values at their classes, the rest's
mean everywhere else; every loss then reads ``logits`` as if it were stored.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

TOPK_VALUES = "logits.topk"
TOPK_INDEX = "logits.topk_index"
TOPK_REST = "logits.rest"


@dataclass
class TargetPlan:
    """Arrays to gather from the cache (``read``) and targets to derive on the device (``derive``:
    target name -> (source array, DCT variant))."""

    read: list[str]
    derive: dict[str, tuple[str, str]] = field(default_factory=dict)
    dense_logits: int = 0  # number of classes when the logits are rebuilt from top-K; 0 = stored
    rename: dict[str, str] = field(default_factory=dict)  # cached tap i -> paired tap j (tap_rename)

    def complete(self, teacher: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``teacher`` (the gathered arrays of one batch) plus the derived targets, (B,H,W) float32,
        with the per-tap arrays of the paired teacher taps renamed to their pair's index."""
        if self.rename:
            return {self.rename.get(k, k): v for k, v in self._complete(teacher).items()}
        return self._complete(teacher)

    def _complete(self, teacher: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if not self.derive and not self.dense_logits:
            return teacher
        from kdpipe.losses.dct import dct_transform

        out = dict(teacher)
        with torch.no_grad():
            if self.dense_logits:
                out["logits"] = dense_logits(
                    teacher[TOPK_VALUES], teacher[TOPK_INDEX], teacher[TOPK_REST], self.dense_logits
                )
            for name, (src, variant) in self.derive.items():
                out[name] = dct_transform(teacher[src].float(), variant)
        return out


def dense_logits(
    values: torch.Tensor, index: torch.Tensor, rest: torch.Tensor, num_classes: int
) -> torch.Tensor:
    """(B,C) float32 logits: ``values`` (B,K) at classes ``index`` (B,K), ``rest`` (B,1) elsewhere."""
    out = rest.float().reshape(-1, 1).expand(-1, num_classes).clone()
    return out.scatter_(1, index.long(), values.float())


def tap_rename(names: list[str], taps: list[int]) -> dict[str, str]:
    """Per-tap array names of cached tap ``taps[j]`` -> the same name for tap ``j`` (``at.5`` ->
    ``at.1``), for the names that change; the losses pair teacher tap j with student tap j."""
    index = {str(i): str(j) for j, i in enumerate(taps) if i != j}
    out = {}
    for n in names:
        head, _, last = n.rpartition(".")
        if head and last in index and head.split(".")[0] in ("at", "dct", "pooled", "attn"):
            out[n] = f"{head}.{index[last]}"
    return out


def plan_targets(
    kinds: set[str],
    num_taps: int,
    dct_variant: str,
    available: set[str],
    num_classes: int = 0,
    taps: list[int] | None = None,
) -> TargetPlan:
    """The arrays a method needing target ``kinds`` reads from a cache holding ``available``.

    "logits" reads ``logits`` when stored, else the top-K pair; "dct" reads the stored
    ``dct.{variant}.{i}`` when present, else derives it from ``at.{i}``. Missing arrays are listed as
    read, so the caller's check names them. ``taps``: the cached taps paired with the student
    (default: the first ``num_taps``); their arrays are renamed to 0, 1, ... by ``complete``.
    """
    read: list[str] = []
    derive: dict[str, tuple[str, str]] = {}
    compact = "logits" in kinds and "logits" not in available and TOPK_VALUES in available
    if "logits" in kinds:
        read += [TOPK_VALUES, TOPK_INDEX, TOPK_REST] if compact else ["logits"]
    chosen = list(range(num_taps)) if taps is None else list(taps)
    for i in chosen:
        read += [f"at.{i}"] if "at" in kinds else []
        if "dct" in kinds:
            name = f"dct.{dct_variant}.{i}"
            if name not in available and f"at.{i}" in available:
                derive[name] = (f"at.{i}", dct_variant)
                read += [] if f"at.{i}" in read else [f"at.{i}"]
            else:
                read.append(name)
        read += [f"pooled.{i}"] if "pooled" in kinds else []
    read += ["grad"] if "grad" in kinds else []
    rename = tap_rename(read + list(derive), chosen)
    return TargetPlan(read=read, derive=derive, dense_logits=num_classes if compact else 0, rename=rename)
