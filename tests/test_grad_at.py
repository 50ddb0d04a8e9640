"""`--method grad-at` (and `--flip-symmetry`): the student's loss and its gradient against float64
references written here.

- A linear softmax student, whose input gradient is known in closed form,
  ``dCE_sum/dx_b = W^T (softmax(z_b) - onehot(y_b))``: the loss terms equal the closed form, and the
  gradient of the total w.r.t. W (double back-propagation through kdpipe's DistillModule) equals
  central finite differences of the closed-form loss, all in float64.
- A small non-linear (tanh) conv student: the double-back-propagated gradient equals central finite
  differences of kdpipe's own loss in float64.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from kdpipe.data.preprocess import Normalize
from kdpipe.gradient import parse_form
from kdpipe.losses import parse_method
from kdpipe.train.model import DistillModule

B, C, H, W, K = 4, 3, 4, 4, 5
NORM = Normalize(scale=1 / 255, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.5), channels=3)
DX_DU = 255 * (1 / 255) / np.array(NORM.std)  # d x / d u per channel


class _NoTaps:
    features: list[torch.Tensor] = []


class Linear(nn.Module):
    def __init__(self, w: np.ndarray) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.from_numpy(w.copy()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1) @ self.w.T


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def _closed_form(
    w: np.ndarray, x: np.ndarray, y: np.ndarray, jt: np.ndarray, form: str, weights: dict
) -> dict:
    """Every term of the linear student by hand, float64."""
    z = x.reshape(B, -1) @ w.T
    p = _softmax(z)
    onehot = np.eye(K)[y]
    ce = -np.log(p[np.arange(B), y]).mean()
    dx = ((p - onehot) @ w).reshape(B, C, H, W)  # dCE_sum/dx
    ju = dx * DX_DU.reshape(1, C, 1, 1)
    js = ju.sum(1, keepdims=True).reshape(B, 1, 2, 2, 2, 2).mean((3, 5)) if form == "csum+pool:2" else ju
    grad_at = ((js - jt) ** 2).reshape(B, -1).sum(1).mean()
    zf = x[..., ::-1].reshape(B, -1) @ w.T  # the flipped batch
    dxf = ((_softmax(zf) - onehot) @ w).reshape(B, C, H, W)
    flip = ((ju - (dxf * DX_DU.reshape(1, C, 1, 1))[..., ::-1]) ** 2).reshape(B, -1).sum(1).mean()
    terms = {"ce": ce, "grad-at": grad_at, "flip": flip}
    terms["total"] = sum(weights[k] * v for k, v in terms.items() if k in weights)
    return terms


def _module(student: nn.Module, form: str, flip: bool, weights: dict) -> DistillModule:
    method = parse_method("grad-at", weights, flip_symmetry=flip)
    method.grad_form = parse_form(form)
    return DistillModule(student, _NoTaps(), method, NORM).double()


@pytest.mark.parametrize(("form", "flip"), [("full", False), ("full", True), ("csum+pool:2", True)])
def test_linear_student_loss_and_gradient_equal_the_closed_form(form, flip):
    rng = np.random.default_rng(0)
    w = rng.standard_normal((K, C * H * W)) * 0.3
    x = rng.standard_normal((B, C, H, W))
    y = rng.integers(0, K, B)
    jt = rng.standard_normal((B, *parse_form(form).shape((C, H, W)))) * 0.05
    weights = {"ce": 1.0, "grad-at": 3.0, **({"flip": 2.0} if flip else {})}
    module = _module(Linear(w), form, flip, weights)
    loss, terms, _ = module(torch.from_numpy(x), torch.from_numpy(y), {"grad": torch.from_numpy(jt)})
    ref = _closed_form(w, x, y, jt, form, weights)
    assert set(terms) == set(weights) | {"total"}
    for k in terms:
        assert terms[k] == pytest.approx(ref[k], rel=1e-12), k
    loss.backward()
    got = module.student.w.grad.numpy()
    h, idx = 1e-6, [(0, 0), (1, 17), (4, 47), (2, 30)]
    for i, j in idx:  # central finite differences of the closed-form total
        wp, wm = w.copy(), w.copy()
        wp[i, j] += h
        wm[i, j] -= h
        fd = (
            _closed_form(wp, x, y, jt, form, weights)["total"]
            - _closed_form(wm, x, y, jt, form, weights)["total"]
        ) / (2 * h)
        assert got[i, j] == pytest.approx(fd, rel=1e-6, abs=1e-9), (i, j)


class TanhConv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(C, 4, 3, padding=1)
        self.fc = nn.Linear(4 * H * W, K)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.tanh(self.conv(x)).flatten(1))


def test_nonlinear_student_gradient_equals_finite_differences():
    torch.manual_seed(0)
    student = TanhConv().double()
    weights = {"ce": 1.0, "grad-at": 5.0, "flip": 1.0}
    module = _module(student, "full", True, weights)
    rng = np.random.default_rng(1)
    x = torch.from_numpy(rng.standard_normal((B, C, H, W)))
    y = torch.from_numpy(rng.integers(0, K, B))
    teacher = {"grad": torch.from_numpy(rng.standard_normal((B, C, H, W)) * 0.05)}
    loss, _, _ = module(x, y, teacher)
    loss.backward()
    p = student.conv.weight
    got = p.grad.clone()
    h = 1e-6
    for idx in [(0, 0, 0, 0), (1, 2, 1, 1), (3, 1, 2, 0)]:
        with torch.no_grad():
            p[idx] += h
            up = float(module(x, y, teacher)[0])
            p[idx] -= 2 * h
            down = float(module(x, y, teacher)[0])
            p[idx] += h
        assert float(got[idx]) == pytest.approx((up - down) / (2 * h), rel=1e-6, abs=1e-9), idx


def test_method_strings_and_weights():
    m = parse_method("grad-at+kd", {"grad-at": 7})
    assert (
        m.terms == ["ce", "kd", "grad-at"]
        and m.weights["grad-at"] == 7
        and m.required_targets
        == {
            "logits",
            "grad",
        }
    )
    m = parse_method("grad-at+at", flip_symmetry=True)
    assert m.terms == ["ce", "at", "grad-at", "flip"] and m.needs_input_grad
    assert m.weights["flip"] == m.weights["grad-at"] and "grad" in m.required_targets
    assert not parse_method("at+kd").needs_input_grad
