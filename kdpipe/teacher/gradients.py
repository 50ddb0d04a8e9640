"""The teacher's input gradients J_T (``--targets grad``) through its PyTorch replica.

One :class:`TeacherGradients` per job: the replica is built once, checked against onnxruntime on the
first batch it sees, then gives ``J_T = dCE_sum/du`` (kdpipe.gradient) per view in the stored form.
"""

from __future__ import annotations

import numpy as np
import torch

from kdpipe.gradient import GradForm, input_gradient, to_image_space
from kdpipe.teacher.graph import TeacherGraph
from kdpipe.teacher.replica import build_replica, check_replica
from kdpipe.teacher.spec import TeacherSpec
from kdpipe.teacher.taps import TapInfo


def check_taps(graph: TeacherGraph, taps: list[TapInfo]) -> list[TapInfo]:
    """The taps the replica is checked on: the job's, else the auto taps (none if there are none)."""
    if taps:
        return taps
    from kdpipe.errors import KdpipeError
    from kdpipe.teacher.taps import auto_taps

    try:
        return auto_taps(graph)
    except KdpipeError:
        return []


class TeacherGradients:
    """``self(x, labels)``: J_T of model inputs ``x`` (float32 (n, ...) in the model's layout, as made
    by ``spec.preprocess``) with true ``labels`` (n,) int64 -> float32 (n, C', H', W') in ``form``.

    ``batch_size`` bounds the memory of one backward pass; ``worst`` is the replica's largest relative
    difference from onnxruntime on the first batch (None before it ran). ``dtype`` torch.float64 gives a
    float64 replica (tests)."""

    def __init__(
        self,
        graph: TeacherGraph,
        taps: list[TapInfo],
        spec: TeacherSpec,
        form: GradForm,
        batch_size: int = 256,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        self.graph, self.spec, self.form = graph, spec, form
        self.taps = check_taps(graph, taps)
        self.replica = build_replica(graph, self.taps)
        self.batch_size = max(1, int(batch_size))
        self.dtype = dtype
        self.worst: float | None = None

    def check(self, x: np.ndarray) -> float:
        """Replica vs onnxruntime on ``x`` (logits and taps); KdpipeError beyond tolerance."""
        self.worst = check_replica(self.replica, self.graph, self.taps, x)
        if self.dtype != torch.float32:
            self.replica = self.replica.to(self.dtype)
        return self.worst

    def _batch(self, x: np.ndarray, labels: np.ndarray) -> np.ndarray:
        xt = torch.from_numpy(np.ascontiguousarray(x)).to(self.dtype)
        yt = torch.from_numpy(np.asarray(labels, dtype=np.int64))
        dx, _ = input_gradient(lambda t: self.replica(t)["logits"], xt, yt)
        with torch.no_grad():
            du = self.form.reduce(to_image_space(dx, self.spec.normalize))
        return du.to(torch.float64 if self.dtype == torch.float64 else torch.float32).numpy()

    def __call__(self, x: np.ndarray, labels: np.ndarray) -> np.ndarray:
        if len(x) == 0:  # nothing to check the replica on (onnxruntime fails on some empty batches)
            return np.zeros((0, *self.shape), np.float64 if self.dtype == torch.float64 else np.float32)
        if self.worst is None:
            self.check(x[: self.batch_size])
        parts = [
            self._batch(x[b : b + self.batch_size], labels[b : b + self.batch_size])
            for b in range(0, len(x), self.batch_size)
        ]
        return np.concatenate(parts)

    @property
    def shape(self) -> tuple[int, int, int]:
        """(C', H', W') of one stored J."""
        h, w = self.spec.size
        return self.form.shape((self.spec.normalize.channels, h, w))
