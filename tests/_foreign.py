"""The committed foreign-exporter fixtures (tests/fixtures/, made by make_foreign_teachers.py): the
ONNX file, the framework's own numbers, and its preprocessing as cache-teacher flags."""

from __future__ import annotations

from pathlib import Path

import numpy as np

FIXTURES = Path(__file__).parent / "fixtures"


def fixture(name: str) -> tuple[str, dict[str, np.ndarray]]:
    """(path of NAME.onnx, the arrays of NAME.npz)."""
    with np.load(FIXTURES / f"{name}.npz") as z:
        return str(FIXTURES / f"{name}.onnx"), {k: z[k] for k in z.files}


def flags(ref: dict[str, np.ndarray]) -> list[str]:
    """The preprocessing the fixture's model expects, as cache-teacher flags."""
    mean = ",".join(repr(float(v)) for v in ref["mean"])
    std = ",".join(repr(float(v)) for v in ref["std"])
    return ["--scale", repr(float(ref["scale"])), "--mean", mean, "--std", std]
