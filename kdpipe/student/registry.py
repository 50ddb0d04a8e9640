"""Model registry (timm-like): zoo names, and user factories given as ``"package.module:callable"``.

``create_model(name, num_classes, in_chans, **kwargs)`` builds a zoo model by name or imports and calls a
user factory. A factory receives ``num_classes`` / ``in_chans`` only when its signature accepts them
(or ``**kwargs``); user kwargs it does not accept are an error, never silently dropped.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.util
import inspect
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import nn

from kdpipe.errors import KdpipeError

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}
F = TypeVar("F", bound=Callable[..., nn.Module])


def register_model(name: str | Callable[..., nn.Module] | None = None) -> Any:
    """Register a factory ``fn(num_classes, in_chans, **kwargs) -> nn.Module``.

    Use as ``@register_model`` (the function's name) or ``@register_model("name")``.
    """

    def deco(fn: F, key: str | None = None) -> F:
        key = key or fn.__name__
        if key in _REGISTRY and _REGISTRY[key] is not fn:
            raise ValueError(f"register_model: {key!r} is already registered")
        _REGISTRY[key] = fn
        return fn

    if callable(name):
        return deco(name)  # type: ignore[arg-type]
    return lambda fn: deco(fn, name)


def list_models() -> list[str]:
    """Sorted names of all registered zoo models."""
    _load_zoo()
    return sorted(_REGISTRY)


def _load_zoo() -> None:
    # importing the zoo modules runs their @register_model decorators
    from kdpipe.student import mobilenetv2, resnet_cifar, resnet_imagenet, vit, wrn  # noqa: F401


def _close(name: str, choices: list[str]) -> str:
    near = difflib.get_close_matches(name, choices, n=5, cutoff=0.5)
    return f"did you mean {', '.join(near)}?" if near else f"known: {', '.join(choices)}"


def _import_factory(spec: str) -> Callable[..., Any]:
    mod_name, _, attr = spec.rpartition(":")
    if not mod_name or not attr:
        raise KdpipeError(
            f"student factory {spec!r}: expected 'package.module:function' or 'file.py:function'"
        )
    try:
        if mod_name.endswith(".py"):
            path = Path(mod_name)
            if not path.is_file():
                raise KdpipeError(f"student factory {spec!r}: file {mod_name} not found")
            mspec = importlib.util.spec_from_file_location(f"kdpipe_user_{path.stem}", path)
            assert mspec is not None and mspec.loader is not None
            module = importlib.util.module_from_spec(mspec)
            sys.modules[mspec.name] = module
            mspec.loader.exec_module(module)
        else:
            module = importlib.import_module(mod_name)
    except KdpipeError:
        raise
    except Exception as e:  # any failure inside the user's module is a user-side problem
        raise KdpipeError(
            f"student factory {spec!r}: importing {mod_name} failed ({type(e).__name__}: {e}); "
            "check that it is on PYTHONPATH and imports cleanly"
        ) from e
    fn = getattr(module, attr, None)
    if fn is None or not callable(fn):
        names = [n for n in dir(module) if not n.startswith("_") and callable(getattr(module, n))]
        raise KdpipeError(
            f"student factory {spec!r}: {mod_name} has no callable {attr!r}; {_close(attr, names)}"
        )
    return fn  # type: ignore[no-any-return]


def _call_factory(fn: Callable[..., Any], label: str, num_classes: int, in_chans: int, kwargs: dict) -> Any:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):  # builtins / C callables: pass everything
        return fn(num_classes=num_classes, in_chans=in_chans, **kwargs)
    var_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    accepted = {n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    call: dict[str, Any] = {}
    for key, val in (("num_classes", num_classes), ("in_chans", in_chans)):
        if var_kw or key in accepted:
            call[key] = val
    unknown = [k for k in kwargs if not var_kw and k not in accepted]
    if unknown:
        raise KdpipeError(
            f"student {label}: unknown argument(s) {', '.join(unknown)}; it accepts "
            f"{', '.join(sorted(accepted - {'num_classes', 'in_chans'})) or 'no extra arguments'}"
        )
    call.update(kwargs)
    try:
        return fn(**call)
    except KdpipeError:
        raise
    except (TypeError, ValueError, AssertionError) as e:
        raise KdpipeError(f"student {label}: building it failed ({type(e).__name__}: {e})") from e


def create_model(name: str, num_classes: int, in_chans: int = 3, **kwargs: Any) -> nn.Module:
    """Build a student: a zoo name (``list_models()``) or a user factory ``"pkg.mod:fn"`` / ``"f.py:fn"``.

    Unknown names raise KdpipeError with close matches; so do failing imports and non-Module results.
    """
    if ":" in name:
        fn = _import_factory(name)
        label = f"factory {name!r}"
    else:
        _load_zoo()
        if name not in _REGISTRY:
            raise KdpipeError(
                f"unknown student model {name!r}; {_close(name, sorted(_REGISTRY))} "
                "(or give a factory as 'package.module:function')"
            )
        fn = _REGISTRY[name]
        label = repr(name)
    model = _call_factory(fn, label, num_classes, in_chans, kwargs)
    if not isinstance(model, nn.Module):
        raise KdpipeError(f"student {label} returned {type(model).__name__}, expected a torch.nn.Module")
    return model


def check_output(model: nn.Module, num_classes: int, in_chans: int, size: tuple[int, int]) -> None:
    """Run one dummy forward (eval mode, no grad) and check the logits are (B, num_classes).

    Useful for user factories that ignore ``num_classes``/``in_chans``. Restores the training mode.
    """
    was_training = model.training
    model.eval()
    try:
        p = next(model.parameters(), None)
        x = torch.zeros(2, in_chans, *size, device=p.device if p is not None else None)
        with torch.no_grad():
            out = model(x)
    except Exception as e:
        raise KdpipeError(
            f"student forward on a (2,{in_chans},{size[0]},{size[1]}) input failed "
            f"({type(e).__name__}: {e}); "
            "check in_chans and the input size"
        ) from e
    finally:
        model.train(was_training)
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (2, num_classes):
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise KdpipeError(
            f"student output is {shape}, expected (batch, {num_classes}) logits; "
            "make the model return logits for num_classes classes"
        )
