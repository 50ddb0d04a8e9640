"""The teacher's preprocessing: input size, normalisation, channel order and layout.

Preprocessing belongs to the teacher (it was trained with it), so it travels with the teacher: as a
small YAML "teacher card" next to the .onnx file, or as command-line flags. A card looks like::

    input_size: [32, 32]      # H, W (or one int for a square); default: the model's input size
    scale: 1/255              # applied to 0..255 pixels first; a number or "1/255"
    mean: [0.4914, 0.4822, 0.4465]
    std: [0.2470, 0.2435, 0.2616]
    channel_order: rgb        # or bgr
    # optional: channels (1|3, default from the model), layout (NCHW|NHWC, default from the model),
    #           name, description
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import yaml

from kdpipe.data.preprocess import Normalize
from kdpipe.errors import KdpipeError
from kdpipe.teacher.graph import TeacherGraph

METADATA_KEY = "kdpipe.preprocess"  # model metadata: JSON of TeacherSpec.to_dict() or a card mapping
CARD_KEYS = (
    "input_size",
    "scale",
    "mean",
    "std",
    "channel_order",
    "channels",
    "layout",
    "name",
    "description",
)


@dataclass(frozen=True)
class TeacherSpec:
    """Preprocessing of the teacher: ``size`` (H, W) in pixels, ``normalize`` (carrying the layout)."""

    size: tuple[int, int]
    normalize: Normalize

    @property
    def layout(self) -> str:
        """ "NCHW" or "NHWC": the layout of the model input this spec produces."""
        return self.normalize.layout

    def __call__(self, images: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """uint8 (B, H, W, C) images of ``size`` -> float32 model input (B,C,H,W) or (B,H,W,C).

        ``out``: optional C-contiguous float32 array of that shape to fill (see ``Normalize``).
        """
        if tuple(images.shape[1:3]) != self.size:
            raise KdpipeError(
                f"teacher input: images are {tuple(images.shape[1:3])} pixels but the teacher expects "
                f"{self.size}; set the view size to the teacher's input size"
            )
        return self.normalize(images, out=out)

    def preprocess(self, images: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """Same as calling the spec: uint8 (B, H, W, C) -> float32 model input."""
        return self(images, out=out)

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form for the cache manifest."""
        return {"input_size": list(self.size), "normalize": self.normalize.to_dict()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TeacherSpec:
        """Inverse of :meth:`to_dict`."""
        extra = set(d) - {"input_size", "normalize"}
        if extra:
            raise KdpipeError(f"teacher spec: unknown keys {sorted(extra)}")
        h, w = (int(v) for v in d["input_size"])
        return cls(size=(h, w), normalize=Normalize.from_dict(d["normalize"]))


def parse_scale(value: Any) -> float:
    """A number or a fraction string like ``"1/255"`` -> float."""
    if isinstance(value, bool):
        raise KdpipeError(f"teacher scale {value!r} is not a number; use e.g. 1/255 or 1")
    if isinstance(value, int | float):
        return float(value)
    text = str(value).strip()
    try:
        if "/" in text:
            num, den = text.split("/", 1)
            return float(num) / float(den)
        return float(text)
    except (ValueError, ZeroDivisionError) as e:
        raise KdpipeError(f"teacher scale {value!r} is not a number; use e.g. 1/255 or 1") from e


def _size(value: Any, graph: TeacherGraph | None, where: str) -> tuple[int, int]:
    if value is None:
        if graph is None or graph.input.height is None or graph.input.width is None:
            raise KdpipeError(
                f"{where}: the teacher input size is not fixed in the model; give input_size [H, W]"
            )
        return graph.input.height, graph.input.width
    vals = (
        [value, value] if isinstance(value, int) else list(value) if isinstance(value, list | tuple) else None
    )
    if vals is None or len(vals) != 2 or not all(isinstance(v, int) and v > 0 for v in vals):
        raise KdpipeError(f"{where}: input_size must be one positive int or [H, W], got {value!r}")
    size = (int(vals[0]), int(vals[1]))
    if graph is not None:
        want = (graph.input.height, graph.input.width)
        if None not in want and size != want:
            raise KdpipeError(
                f"{where}: input_size {list(size)} differs from the model's input {list(want)}; leave "
                "input_size out to use the model's"
            )
    return size


def _floats(value: Any, key: str, where: str) -> tuple[float, ...]:
    vals = value if isinstance(value, list | tuple) else [value]
    try:
        return tuple(float(v) for v in vals)
    except (TypeError, ValueError) as e:
        raise KdpipeError(f"{where}: {key} must be a number or a list of numbers, got {value!r}") from e


def from_flags(
    graph: TeacherGraph | None = None,
    input_size: int | tuple[int, int] | list[int] | None = None,
    scale: float | str = 1.0 / 255.0,
    mean: float | tuple[float, ...] | list[float] = (0.0,),
    std: float | tuple[float, ...] | list[float] = (1.0,),
    channel_order: str = "rgb",
    channels: int | None = None,
    layout: str | None = None,
    where: str = "teacher flags",
) -> TeacherSpec:
    """A spec from explicit values; channels, layout and size default to the model's input."""
    if channels is None:
        if graph is None:
            raise KdpipeError(f"{where}: give channels (1 or 3) or a teacher model")
        channels = graph.input.channels
    if layout is None:
        layout = graph.input.layout if graph is not None else "NCHW"
    if graph is not None and (channels != graph.input.channels or layout != graph.input.layout):
        raise KdpipeError(
            f"{where}: channels={channels} layout={layout} differ from the model input "
            f"({graph.input.channels} channels, {graph.input.layout})"
        )
    for label, vals in (("mean", mean), ("std", std)):
        n = len(np.atleast_1d(np.asarray(vals, dtype=object)))
        if n not in (1, int(channels)):
            raise KdpipeError(
                f"{where}: {label} has {n} values but the teacher input has {channels} channel(s); "
                + ("give 1 value" if int(channels) == 1 else f"give 1 or {channels} values")
            )
    norm = Normalize(
        scale=parse_scale(scale),
        mean=_floats(mean, "mean", where),
        std=_floats(std, "std", where),
        channels=int(channels),
        channel_order=str(channel_order).lower(),
        layout=str(layout).upper(),
    )
    return TeacherSpec(size=_size(input_size, graph, where), normalize=norm)


def load_card(path: str, graph: TeacherGraph | None = None) -> TeacherSpec:
    """Read a YAML teacher card (keys: see module docstring); unknown keys raise KdpipeError."""
    return _from_card(_card(path), graph, f"teacher card {os.fspath(path)!r}")


def _card(path: str) -> dict[str, Any]:
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise KdpipeError(f"teacher card {path!r} does not exist")
    try:
        with open(path, encoding="utf-8") as f:
            card = yaml.safe_load(f)
    except yaml.YAMLError as e:
        raise KdpipeError(f"teacher card {path!r} is not valid YAML: {str(e).splitlines()[0]}") from e
    if card is None:
        card = {}
    if not isinstance(card, dict):
        raise KdpipeError(f"teacher card {path!r} must be a mapping of keys to values")
    unknown = sorted(set(card) - set(CARD_KEYS))
    if unknown:
        raise KdpipeError(f"teacher card {path!r}: unknown keys {unknown}; allowed: {', '.join(CARD_KEYS)}")
    return card


def _from_card(card: dict[str, Any], graph: TeacherGraph | None, where: str) -> TeacherSpec:
    return from_flags(
        graph,
        input_size=card.get("input_size"),
        scale=card.get("scale", 1.0 / 255.0),
        mean=card.get("mean", (0.0,)),
        std=card.get("std", (1.0,)),
        channel_order=card.get("channel_order", "rgb"),
        channels=card.get("channels"),
        layout=card.get("layout"),
        where=where,
    )


def _metadata_card(graph: TeacherGraph) -> dict[str, Any] | None:
    for prop in graph.model.metadata_props:
        if prop.key == METADATA_KEY:
            try:
                d = json.loads(prop.value)
            except json.JSONDecodeError as e:
                raise KdpipeError(f"teacher {graph.path!r}: metadata {METADATA_KEY} is not JSON ({e})") from e
            if isinstance(d, dict) and "normalize" in d:  # TeacherSpec.to_dict() form
                n = d["normalize"]
                return {"input_size": d.get("input_size"), **{k: v for k, v in n.items() if k != "layout"}}
            if isinstance(d, dict):
                return d
    return None


def spec_for(graph: TeacherGraph, card: str | None = None, **overrides: Any) -> TeacherSpec:
    """The teacher's preprocessing: ``card`` (YAML path), else the model's ``kdpipe.preprocess``
    metadata (written into the students kdpipe exports), else defaults (scale 1/255, mean 0, std 1);
    then ``overrides`` (card keys: input_size, scale, mean, std, channel_order) on top.
    """
    bad = sorted(set(overrides) - set(CARD_KEYS))
    if bad:
        raise KdpipeError(f"teacher spec: unknown settings {bad}; allowed: {', '.join(CARD_KEYS)}")
    if card is not None:
        base, where = _card(card), f"teacher card {os.fspath(card)!r}"
    else:
        meta = _metadata_card(graph)
        base, where = (meta, f"{METADATA_KEY} metadata of {graph.path!r}") if meta else ({}, "teacher flags")
    merged = {**base, **{k: v for k, v in overrides.items() if v is not None}}
    flags = "command-line flags" if where == "teacher flags" else f"{where} with command-line flags"
    return _from_card(merged, graph, where if not overrides else flags)
