"""Method strings ("at+kd", ...) -> a weighted sum of loss terms on cached teacher targets.

Default weights (every one overridable through ``weights``):

  ce      ce 1
  kd      ce 0.1, kd 0.9              (1-a) CE + a KD, a = 0.9 (AT code, RepDistiller)
  at      ce 1,   at 1000
  at+kd   ce 0.1, kd 0.9, at 1000     (AT code with alpha 0.9)
  dct     ce 1,   dct 1
  dct+kd  ce 0.1, kd 1,   dct 1       (López-Cifuentes et al.)
  afd     ce 1,   afd 200
  afd+kd  ce 1,   kd 0.9, afd 200     (Ji et al.)

  grad-at ce 1,   grad-at GRAD_AT_WEIGHT   (beta/2; docs/methods.md says why)
  flip    (--flip-symmetry) the same weight as grad-at

Rule behind the table (also for other combinations): at 1000, dct 1, afd 200, grad-at and flip
GRAD_AT_WEIGHT; kd 1 with dct else 0.9; ce 0.1 when kd is present without afd, else 1. "ce" may be
written explicitly ("ce+kd" == "kd").

Two schedule-free remedies for a feature term that dominates early training (docs/results.md, issue
16): ``at_tap_weights`` multiplies each tap pair's AT term (e.g. ``(1, 0.25, 0.0625)`` for 28/14/7
maps gives every tap the same largest possible term, ``4 beta / (h_0 w_0)``), and ``warmup`` ramps a
term's weight linearly from 0 to its value over the first ``warmup[term]`` epochs (the loop sets
``Method.progress``, in epochs, before each step).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from kdpipe.errors import KdpipeError
from kdpipe.gradient import GradForm
from kdpipe.losses.afd import AFD
from kdpipe.losses.at import at_loss
from kdpipe.losses.ce import ce_loss
from kdpipe.losses.dct import dct_loss
from kdpipe.losses.grad_at import flip_loss, grad_at_loss
from kdpipe.losses.kd import kd_loss
from kdpipe.ops import DCT_VARIANTS

TERMS = ("ce", "kd", "at", "dct", "afd", "grad-at", "flip")
GRAD_AT_WEIGHT = 1.0  # beta/2 of grad-at and flip (docs/methods.md, "Gradient-based AT")
_ORDER = {t: i for i, t in enumerate(TERMS)}


def default_weights(terms: Sequence[str]) -> dict[str, float]:
    """Default weight of each term of a method (see the module docstring)."""
    ts = set(terms)
    w: dict[str, float] = {"ce": 0.1 if ("kd" in ts and "afd" not in ts) else 1.0}
    if "kd" in ts:
        w["kd"] = 1.0 if "dct" in ts else 0.9
    grad = (("grad-at", GRAD_AT_WEIGHT), ("flip", GRAD_AT_WEIGHT))
    for t, v in (("at", 1000.0), ("dct", 1.0), ("afd", 200.0), *grad):
        if t in ts:
            w[t] = v
    return w


def _count(teacher: Mapping[str, torch.Tensor], prefix: str) -> int:
    n = 0
    while f"{prefix}{n}" in teacher:
        n += 1
    return n


class Method(nn.Module):
    """A distillation method: ``forward(logits, labels, student_feats, teacher) -> (total, terms)``.

    ``teacher`` maps cache array names to float tensors of the batch: "logits" (B,K), "at.{i}" (B,H,W),
    "pooled.{i}" (B,C), "dct.{variant}.{i}" (B,H,W). ``terms`` holds the *unweighted* value of each
    term as a Python float (plus "total"); total = sum of weight * term.
    Methods with "afd" need ``build(student_channels, teacher_channels)`` before the first call; its
    parameters are then in ``extra_modules()`` (and in this Module's ``parameters()``/``state_dict()``):
    add them to the optimizer, move the Method to the device, call ``.train()/.eval()`` with the student.
    """

    def __init__(
        self,
        terms: Sequence[str],
        weights: Mapping[str, float],
        T: float = 4.0,
        label_smoothing: float = 0.0,
        dct_variant: str = "dft-abs",
        dct_mask: bool = False,
        afd_dim: int = 128,
        at_tap_weights: Sequence[float] = (),
        warmup: Mapping[str, float] | None = None,
    ) -> None:
        super().__init__()
        self.at_tap_weights = [float(w) for w in at_tap_weights]  # empty: every tap 1
        self.warmup = dict(warmup or {})  # term -> epochs of its linear ramp from 0
        self.progress = 0.0  # epochs done (float), set by the training loop before each step
        self.terms = list(terms)
        self.weights = dict(weights)
        self.T, self.label_smoothing = T, label_smoothing
        self.dct_variant, self.dct_mask, self.afd_dim = dct_variant, dct_mask, afd_dim
        self.afd: AFD | None = None
        self.grad_form = GradForm()  # the form of the teacher's cached J_T (set from the cache)

    @property
    def name(self) -> str:
        return "+".join(self.terms)

    @property
    def required_targets(self) -> set[str]:
        """Cache target kinds needed: subset of {"logits", "at", "pooled", "dct"}."""
        need: set[str] = set()
        if "kd" in self.terms or ("dct" in self.terms and self.dct_mask):
            need.add("logits")
        if "at" in self.terms or "afd" in self.terms:
            need.add("at")
        if "afd" in self.terms:
            need.add("pooled")
        if "dct" in self.terms:
            need.add("dct")
        if "grad-at" in self.terms:
            need.add("grad")
        return need

    @property
    def needs_input_grad(self) -> bool:
        """True when the student's input gradient J_S is part of the loss (double back-propagation)."""
        return "grad-at" in self.terms or "flip" in self.terms

    @property
    def needs_features(self) -> bool:
        """True when the student taps must be hooked."""
        return any(t in self.terms for t in ("at", "dct", "afd"))

    @property
    def needs_build(self) -> bool:
        return "afd" in self.terms and self.afd is None

    def build(self, student_channels: Sequence[int], teacher_channels: Sequence[int]) -> None:
        """Create the learned parts (AFD meta-network); a no-op for methods without them."""
        if "afd" in self.terms:
            self.afd = AFD(list(teacher_channels), list(student_channels), self.afd_dim)

    def extra_modules(self) -> list[nn.Module]:
        """Modules with trainable parameters the optimizer must also update (empty unless AFD)."""
        return [self.afd] if self.afd is not None else []

    def _pairs(self, kind: str, student_feats: Sequence[torch.Tensor], n_teacher: int) -> None:
        if n_teacher == 0:
            raise KdpipeError(f"method {self.name!r} needs teacher {kind!r} targets; the cache has none")
        if len(student_feats) != n_teacher:
            raise KdpipeError(
                f"method {self.name!r} pairs student tap i with teacher tap i, but the student has "
                f"{len(student_feats)} taps and the teacher cache {n_teacher}; choose student taps to match"
            )

    def forward(
        self,
        logits: torch.Tensor,
        labels: torch.Tensor,
        student_feats: Sequence[torch.Tensor],
        teacher: Mapping[str, torch.Tensor],
        student_grad: torch.Tensor | None = None,
        flipped_grad: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """``student_grad``: J_S (B,C,H,W) with its graph (grad-at, flip); ``flipped_grad``:
        flip(J_S(flip x)) (flip)."""
        vals: dict[str, torch.Tensor] = {}
        for term in self.terms:
            if term == "ce":
                vals[term] = ce_loss(logits, labels, self.label_smoothing)
            elif term == "kd":
                if "logits" not in teacher:
                    raise KdpipeError(f"method {self.name!r} needs teacher logits; the cache has none")
                vals[term] = kd_loss(logits, teacher["logits"], self.T)
            elif term == "at":
                n = _count(teacher, "at.")
                self._pairs("at", student_feats, n)
                if self.at_tap_weights and len(self.at_tap_weights) != n:
                    raise KdpipeError(
                        f"--at-tap-weights gives {len(self.at_tap_weights)} weight(s) for {n} AT tap "
                        "pair(s); give one per pair"
                    )
                maps = [teacher[f"at.{i}"] for i in range(n)]
                vals[term] = at_loss(student_feats, maps, self.at_tap_weights or None)
            elif term == "dct":
                prefix = f"dct.{self.dct_variant}."
                n = _count(teacher, prefix)
                self._pairs(prefix[:-1], student_feats, n)
                mask = None
                if self.dct_mask:
                    if "logits" not in teacher:
                        raise KdpipeError(
                            "the DCT teacher-correct mask needs teacher logits; the cache has none"
                        )
                    mask = teacher["logits"].argmax(dim=1) == labels
                vals[term] = dct_loss(
                    student_feats, [teacher[f"{prefix}{i}"] for i in range(n)], self.dct_variant, mask
                )
            elif term == "afd":
                if self.afd is None:
                    raise RuntimeError("Method.build(student_channels, teacher_channels) must run before AFD")
                n = _count(teacher, "at.")
                if n == 0 or _count(teacher, "pooled.") != n:
                    raise KdpipeError("method 'afd' needs teacher 'at' and 'pooled' targets for every tap")
                vals[term] = self.afd(
                    student_feats,
                    [teacher[f"pooled.{i}"] for i in range(n)],
                    [teacher[f"at.{i}"] for i in range(n)],
                )
            elif term in ("grad-at", "flip"):
                vals[term] = self._grad_term(term, teacher, student_grad, flipped_grad)
        total = sum(
            (self.weight_now(t) * v for t, v in vals.items() if self.weights[t] != 0),
            torch.zeros((), device=logits.device),
        )
        out = {t: float(v.detach()) for t, v in vals.items()}
        out["total"] = float(total.detach())
        return total, out

    def weight_now(self, term: str) -> float:
        """The weight of ``term`` at ``self.progress`` epochs: ramped linearly over its warm-up."""
        ramp = self.warmup.get(term, 0.0)
        scale = min(1.0, self.progress / ramp) if ramp > 0 else 1.0
        return self.weights[term] * scale

    def _grad_term(
        self,
        term: str,
        teacher: Mapping[str, torch.Tensor],
        student_grad: torch.Tensor | None,
        flipped_grad: torch.Tensor | None,
    ) -> torch.Tensor:
        if student_grad is None:
            raise RuntimeError(f"method term {term!r} needs the student's input gradient")
        if term == "flip":
            if flipped_grad is None:
                raise RuntimeError("the flip term needs the student's gradient on the flipped batch")
            return flip_loss(student_grad, flipped_grad)
        if "grad" not in teacher:
            raise KdpipeError(f"method {self.name!r} needs the teacher's input gradients; the cache has none")
        return grad_at_loss(student_grad, teacher["grad"], self.grad_form)

    def describe(self) -> str:
        """One line: the weighted formula, e.g. ``0.1*ce + 0.9*kd(T=4)``."""
        parts = []
        for t in self.terms:
            extra = {
                "kd": f"(T={self.T:g})",
                "dct": f"({self.dct_variant}{', mask' if self.dct_mask else ''})",
                "grad-at": f"({self.grad_form.text})",
            }
            if t == "at" and self.at_tap_weights:
                extra["at"] = "(taps x " + ",".join(f"{w:g}" for w in self.at_tap_weights) + ")"
            ramp = f" (ramped over {self.warmup[t]:g} epochs)" if self.warmup.get(t) else ""
            parts.append(f"{self.weights[t]:g}*{t}{extra.get(t, '')}{ramp}")
        return " + ".join(parts)


def parse_method(
    spec: str,
    weights: Mapping[str, float] | None = None,
    *,
    T: float = 4.0,
    label_smoothing: float = 0.0,
    dct_variant: str = "dft-abs",
    dct_mask: bool = False,
    afd_dim: int = 128,
    flip_symmetry: bool = False,
    at_tap_weights: Sequence[float] = (),
    warmup: Mapping[str, float] | None = None,
    **unknown: Any,
) -> Method:
    """Parse "kd", "at+kd", "dct+kd", ... into a Method with default weights, overridden by ``weights``.

    A weight for a term not in the method adds that term (e.g. ``parse_method("at", {"kd": 0.5})``).
    ``flip_symmetry`` adds the "flip" term (as writing "+flip" does). Unknown terms, weights or options
    raise KdpipeError.
    """
    if unknown:
        raise KdpipeError(f"unknown method option(s) {', '.join(unknown)}")
    parts = [p.strip().lower() for p in spec.split("+") if p.strip()]
    bad = [p for p in parts if p not in TERMS]
    if not parts or bad:
        raise KdpipeError(
            f"unknown method term(s) {', '.join(bad) or repr(spec)} in {spec!r}; "
            f"terms: {', '.join(TERMS)} joined by '+'"
        )
    w = dict(weights or {})
    bad = [k for k in w if k not in TERMS]
    if bad:
        raise KdpipeError(f"unknown loss weight(s) {', '.join(bad)}; terms: {', '.join(TERMS)}")
    flip = {"flip"} if flip_symmetry else set()
    terms = sorted(set(parts) | {"ce"} | set(w) | flip, key=_ORDER.__getitem__)
    final = default_weights(terms)
    final.update({k: float(v) for k, v in w.items()})
    if dct_variant not in DCT_VARIANTS:
        raise KdpipeError(f"unknown DCT variant {dct_variant!r}; choose one of {', '.join(DCT_VARIANTS)}")
    if T <= 0:
        raise KdpipeError(f"KD temperature must be > 0, got {T}")
    _check_remedies(terms, at_tap_weights, warmup or {})
    return Method(terms, final, T, label_smoothing, dct_variant, dct_mask, afd_dim, at_tap_weights, warmup)


def _check_remedies(terms: Sequence[str], tap_weights: Sequence[float], warmup: Mapping[str, float]) -> None:
    if tap_weights and "at" not in terms:
        raise KdpipeError(
            "--at-tap-weights applies to the at term; the method has none (e.g. --method at+kd)"
        )
    if any(not (float(w) >= 0) for w in tap_weights):
        raise KdpipeError(f"--at-tap-weights must be >= 0, got {','.join(map(str, tap_weights))}")
    bad = [t for t in warmup if t not in terms]
    if bad:
        raise KdpipeError(
            f"--term-warmup names term(s) {', '.join(bad)} the method does not have ({'+'.join(terms)})"
        )
    neg = [t for t, e in warmup.items() if not (float(e) >= 0)]
    if neg:
        raise KdpipeError(f"--term-warmup {neg[0]}={warmup[neg[0]]}: epochs must be >= 0")
