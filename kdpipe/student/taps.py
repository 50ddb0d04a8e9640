"""Student taps: forward hooks that capture intermediate activations for feature distillation.

``StudentTaps(model, spec)`` with spec:
- ``"auto"``: the model's ``kd_taps`` (zoo models: stage outputs); for a model without ``kd_taps``, the
  *auto rule* below, found by tracing one dummy forward;
- ``"blocks"``: every residual block's output (zoo: ``kd_blocks``; else the auto-rule candidates that sit
  directly in a container such as ``nn.Sequential``) -- AFD's student layers;
- a list of module paths as in ``model.named_modules()`` (e.g. ``["layer1", "layer2.1"]``).

Auto rule (user models): trace one forward in eval mode. A *candidate* is a non-root module whose
output is a 4-D tensor and whose submodules (if any) all produced 4-D outputs at the module's own input
or output resolution (this admits downsampling blocks and stages, and drops containers spanning more
resolutions, e.g. a whole VGG-style ``features`` Sequential). When any candidate has
submodules ("block-level": blocks and stages, whose output includes the residual add that a functional
``x + y`` leaves outside every leaf module), only those count, else leaf modules count. For each
spatial resolution, in order of first appearance, the tap is the candidate at that resolution that
*finished* last. Stage containers finish after their last block, so a ResNet gets ``layer1..layerN``.
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from kdpipe.errors import KdpipeError

_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


def _infer_in_chans(model: nn.Module) -> int:
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            return int(m.in_channels)
    return 3


def _first_tensor(out: Any) -> torch.Tensor | None:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    return None


def trace_modules(
    model: nn.Module, input_shape: Sequence[int] | None = None
) -> list[tuple[str, tuple[int, ...], tuple[int, ...]]]:
    """Run one dummy forward (eval, no grad, batch 1) and return (module path, output shape, input shape)
    in the order the modules *finished*, for every non-root module returning a tensor (input shape () when
    its first input is not a tensor). ``input_shape`` is (C,H,W); default (first conv's in_channels, 32,
    32). The model's training mode is restored."""
    shape = tuple(input_shape) if input_shape is not None else (_infer_in_chans(model), 32, 32)
    order: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = []
    handles = []
    for name, mod in model.named_modules():
        if not name:
            continue

        def hook(_m: nn.Module, inp: Any, out: Any, name: str = name) -> None:
            t = _first_tensor(out)
            i = _first_tensor(inp)
            if t is not None:
                order.append((name, tuple(t.shape), () if i is None else tuple(i.shape)))

        handles.append(mod.register_forward_hook(hook))
    was_training = model.training
    p = next(model.parameters(), None)
    x = torch.zeros(
        1, *shape, device=p.device if p is not None else None, dtype=p.dtype if p is not None else None
    )
    try:
        model.eval()
        with torch.no_grad():
            model(x)
    except Exception as e:
        raise KdpipeError(
            f"student taps: tracing a {tuple(x.shape)} dummy input failed ({type(e).__name__}: {e}); "
            "pass input_shape=(C,H,W) matching the training images"
        ) from e
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return order


def _candidates(
    model: nn.Module, order: list[tuple[str, tuple[int, ...], tuple[int, ...]]]
) -> list[tuple[str, tuple, bool]]:
    """(name, (H,W), is_composite) of the auto-rule candidates, in finishing order."""
    last: dict[str, tuple[int, ...]] = {}
    for name, shp, _ in order:
        last[name] = shp
    cands = []
    seen: set[str] = set()
    for name, shp, ishp in order:
        if len(shp) != 4 or name in seen:
            continue
        mod = model.get_submodule(name)
        subs = [f"{name}.{n}" for n, _ in mod.named_modules() if n]
        allowed = {shp[2:], ishp[2:] if len(ishp) == 4 else shp[2:]}
        if any(len(last[s]) != 4 or last[s][2:] not in allowed for s in subs if s in last):
            continue
        cands.append((name, shp[2:], bool(subs)))
        seen.add(name)
    # a module called twice: keep its last finishing position
    final: dict[str, tuple[str, tuple, bool]] = {}
    for c in cands:
        final.pop(c[0], None)
        final[c[0]] = c
    return list(final.values())


def auto_taps(model: nn.Module, input_shape: Sequence[int] | None = None) -> list[str]:
    """Stage outputs of ``model`` by the auto rule (module docstring); ``kd_taps`` is *not* consulted."""
    cands = _candidates(model, trace_modules(model, input_shape))
    if any(c[2] for c in cands):
        cands = [c for c in cands if c[2]]
    by_res: dict[tuple, str] = {}
    for name, res, _ in cands:  # finishing order: later overwrites earlier; dict keeps first-seen order
        by_res[res] = name
    if not by_res:
        raise KdpipeError(
            "student taps: no module of the model outputs a 4-D (B,C,H,W) tensor; name taps explicitly"
        )
    return list(by_res.values())


def auto_blocks(model: nn.Module, input_shape: Sequence[int] | None = None) -> list[str]:
    """Every block output: auto-rule composite candidates whose parent is a container (Sequential, ...)."""
    cands = _candidates(model, trace_modules(model, input_shape))
    out = []
    for name, _, composite in cands:
        parent = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
        if composite and isinstance(parent, _CONTAINERS):
            out.append(name)
    if not out:
        raise KdpipeError(
            "student taps: found no residual blocks (modules inside a Sequential); name taps explicitly"
        )
    return out


class StudentTaps:
    """Forward hooks on the chosen modules of ``model``.

    ``.names``: module paths in tap order; ``.features``: the tensors (B,C,H,W) those modules returned in
    the most recent forward (with autograd history), same order. Hooks stay until ``.remove()``.
    """

    def __init__(
        self, model: nn.Module, spec: str | Sequence[str] = "auto", input_shape: Sequence[int] | None = None
    ) -> None:
        self.model = model
        if isinstance(spec, str) and spec == "auto":
            names = list(getattr(model, "kd_taps", None) or auto_taps(model, input_shape))
        elif isinstance(spec, str) and spec == "blocks":
            names = list(getattr(model, "kd_blocks", None) or auto_blocks(model, input_shape))
        elif isinstance(spec, str):
            names = [s.strip() for s in spec.split(",") if s.strip()]
        else:
            names = list(spec)
        if not names:
            raise KdpipeError("student taps: empty tap list; use 'auto' or module paths")
        modules = dict(model.named_modules())
        for n in names:
            if n not in modules or not n:
                near = difflib.get_close_matches(n, [k for k in modules if k], n=5, cutoff=0.5)
                hint = (
                    f"did you mean {', '.join(near)}?"
                    if near
                    else "see model.named_modules() for valid paths"
                )
                raise KdpipeError(f"student tap {n!r} is not a module of {type(model).__name__}; {hint}")
        self.names: list[str] = names
        self._store: dict[str, torch.Tensor] = {}
        self._handles = [modules[n].register_forward_hook(self._hook(n)) for n in names]

    def _hook(self, name: str):  # type: ignore[no-untyped-def]
        def hook(_m: nn.Module, _i: Any, out: Any) -> None:
            t = _first_tensor(out)
            if t is None or t.ndim != 4:
                raise KdpipeError(
                    f"student tap {name!r} returned {type(out).__name__}"
                    f"{'' if t is None else tuple(t.shape)}, expected a 4-D (B,C,H,W) tensor"
                )
            self._store[name] = t

        return hook

    @property
    def features(self) -> list[torch.Tensor]:
        """Activations of the last forward, in ``names`` order."""
        missing = [n for n in self.names if n not in self._store]
        if missing:
            raise KdpipeError(f"student taps {', '.join(missing)} did not run in the last forward")
        return [self._store[n] for n in self.names]

    def clear(self) -> None:
        """Drop the stored activations (frees their autograd graph)."""
        self._store.clear()

    def probe(self, input_shape: Sequence[int]) -> list[tuple[int, int, int]]:
        """(C,H,W) of every tap for an input of shape (C,H,W): one dummy forward, eval mode, no grad."""
        order = {name: shp for name, shp, _ in trace_modules(self.model, input_shape)}
        self._store.clear()
        return [tuple(order[n][1:]) for n in self.names]  # type: ignore[misc]

    def remove(self) -> None:
        """Remove the hooks."""
        for h in self._handles:
            h.remove()
        self._handles = []
        self._store.clear()

    def __enter__(self) -> StudentTaps:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()
