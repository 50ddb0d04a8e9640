"""Losses vs independent float64 NumPy implementations written from the formulas."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kdpipe.errors import KdpipeError
from kdpipe.losses import AFD, at_loss, ce_loss, dct_loss, dct_transform, kd_loss, parse_method

RTOL = 1e-6
rng = np.random.default_rng(0)


def t64(a: np.ndarray) -> torch.Tensor:
    return torch.tensor(a, dtype=torch.float64)


def np_logsoftmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def np_l2n(a: np.ndarray) -> np.ndarray:
    f = a.reshape(a.shape[0], -1)
    return f / np.maximum(np.sqrt((f * f).sum(1, keepdims=True)), 1e-12)


def np_area_pool(a: np.ndarray, h: int, w: int) -> np.ndarray:
    b, hh, ww = a.shape
    return a.reshape(b, h, hh // h, w, ww // w).mean(axis=(2, 4))


def np_dct_target(a: np.ndarray, variant: str) -> np.ndarray:
    a0 = a - a.mean(axis=(1, 2), keepdims=True)
    n = a.shape[1]
    if variant == "dct2":
        m = np.array([[np.cos(np.pi * (2 * i + 1) * k / (2 * n)) for i in range(n)] for k in range(n)])
        m *= np.sqrt(2.0 / n)
        m[0] /= np.sqrt(2.0)
        r = np.stack([m @ x @ m.T for x in a0])
    else:
        r = np.fft.fft2(a0).real
        if variant == "dft-abs":
            r = np.abs(r)
    f = r.reshape(len(a), -1)
    lo, hi = f.min(1, keepdims=True), f.max(1, keepdims=True)
    den = hi if variant == "dft-abs" else hi - lo
    return ((f - lo) / den).reshape(a.shape)


def test_ce_and_kd_match_numpy() -> None:
    z, zt = rng.normal(size=(6, 5)) * 3, rng.normal(size=(6, 5)) * 3
    y = rng.integers(0, 5, 6)
    eps = 0.1
    q = np.full((6, 5), eps / 5) + (1 - eps) * np.eye(5)[y]
    ref_ce = -(q * np_logsoftmax(z)).sum(1).mean()
    assert ce_loss(t64(z), torch.tensor(y), eps).item() == pytest.approx(ref_ce, rel=RTOL)
    T = 4.0
    ls, lt = np_logsoftmax(z / T), np_logsoftmax(zt / T)
    ref_kd = (np.exp(lt) * (lt - ls)).sum() / 6 * T * T
    assert kd_loss(t64(z), t64(zt), T).item() == pytest.approx(ref_kd, rel=RTOL)


def test_at_pools_student_map_by_area() -> None:
    fs = [rng.normal(size=(3, 4, 8, 8)), rng.normal(size=(3, 6, 4, 4))]
    ft = [rng.normal(size=(3, 5, 4, 4)), rng.normal(size=(3, 7, 4, 4))]
    vt = [np_l2n((f**2).mean(1)).reshape(3, 4, 4) for f in ft]
    ref = 0.0
    for s, v in zip(fs, vt, strict=True):
        sm = np_l2n(np_area_pool((s**2).mean(1), 4, 4))
        ref += ((sm - v.reshape(3, -1)) ** 2).mean()
    got = at_loss([t64(f) for f in fs], [t64(v) for v in vt])
    assert got.item() == pytest.approx(ref, rel=RTOL)


def test_channel_energy_gradient_matches_the_formula() -> None:
    """The hand-written backward of mean_c(F**2): dL/dF = 2/C * F * dL/dE, computed here in float64."""
    from kdpipe.losses.common import channel_energy

    f = rng.standard_normal((3, 5, 8, 8)).astype(np.float32)
    g = rng.standard_normal((3, 4, 4))  # upstream gradient of the area-pooled (4x4) map
    ft = torch.tensor(f, requires_grad=True)
    (channel_energy(ft, (4, 4)) * torch.tensor(g, dtype=torch.float32)).sum().backward()
    up = np.repeat(np.repeat(g, 2, axis=1), 2, axis=2) / 4.0  # area-pool backward: each input gets 1/4
    ref = 2.0 / f.shape[1] * f.astype(np.float64) * up[:, None]
    assert ft.grad is not None
    np.testing.assert_allclose(ft.grad.numpy(), ref, rtol=1e-5, atol=1e-7)
    energy = channel_energy(torch.tensor(f)).numpy()
    np.testing.assert_allclose(energy, (f.astype(np.float64) ** 2).mean(axis=1), rtol=RTOL)


@pytest.mark.parametrize("variant", ["dft-abs", "dft", "dct2"])
def test_dct_transform_and_loss_match_numpy(variant: str) -> None:
    a = rng.random(size=(4, 6, 6))
    np.testing.assert_allclose(dct_transform(t64(a), variant).numpy(), np_dct_target(a, variant), atol=1e-12)
    fs = [rng.normal(size=(4, 3, 12, 12)), rng.normal(size=(4, 5, 6, 6))]
    dt = [np_dct_target(rng.random(size=(4, 6, 6)), variant) for _ in fs]
    labels = torch.tensor([0, 1, 2, 3])
    mask = np.array([1.0, 0.0, 1.0, 1.0])
    per = np.zeros(4)
    for f, d in zip(fs, dt, strict=True):
        ds = np_dct_target(np_area_pool((f**2).mean(1), 6, 6), variant)
        per += np.sqrt(((ds - d) ** 2).reshape(4, -1).sum(1))
    got = dct_loss([t64(f) for f in fs], [t64(d) for d in dt], variant, torch.tensor(mask) > 0)
    assert got.item() == pytest.approx((per * mask).mean(), rel=RTOL)
    # the composer applies the teacher-correct mask from the cached logits
    logits = np.eye(4)[[0, 3, 2, 3]] * 5.0
    m = parse_method("dct", dct_variant=variant, dct_mask=True)
    teacher = {"logits": t64(logits), **{f"dct.{variant}.{i}": t64(d) for i, d in enumerate(dt)}}
    _, terms = m(t64(rng.normal(size=(4, 4))), labels, [t64(f) for f in fs], teacher)
    assert terms["dct"] == pytest.approx((per * mask).mean(), rel=RTOL)


@pytest.mark.parametrize("variant", ["dft-abs", "dft", "dct2"])
def test_dct_gradients_finite_at_zero_distance_and_constant_maps(variant: str) -> None:
    f = torch.tensor(rng.normal(size=(2, 3, 4, 4)), dtype=torch.float32, requires_grad=True)
    d_same = torch.tensor(
        np_dct_target((f.detach().double().numpy() ** 2).mean(1), variant), dtype=torch.float32
    )
    const = torch.ones(2, 3, 4, 4, requires_grad=True)
    for feats, target in ((f, d_same), (const, torch.zeros(2, 4, 4))):
        loss = dct_loss([feats], [target], variant)
        loss.backward()
        assert torch.isfinite(loss) and loss.item() < 1e-5
        assert feats.grad is not None and torch.isfinite(feats.grad).all()
    assert (dct_transform(torch.full((2, 5, 5), 3.7), variant) == 0).all()


def test_at_and_kd_gradients_finite_for_identical_and_constant_maps() -> None:
    f = torch.ones(2, 3, 4, 4, requires_grad=True)
    v = torch.full((2, 4, 4), 0.25)
    loss = at_loss([f], [v])
    loss.backward()
    assert loss.item() == pytest.approx(0.0, abs=1e-12) and torch.isfinite(f.grad).all()


def np_bn(x: np.ndarray, g: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (x - x.mean(0)) / np.sqrt(x.var(0) + 1e-5) * g + b


def test_afd_matches_numpy_reimplementation() -> None:
    torch.manual_seed(0)
    tc, sc, d = [4, 6], [3, 5, 7], 8
    afd = AFD(tc, sc, d).double()
    for p in afd.parameters():  # non-trivial BN affine parameters
        p.data.normal_()
    B = 5
    fs = [rng.normal(size=(B, c, hw, hw)) for c, hw in zip(sc, (8, 4, 4), strict=True)]
    g_t = [rng.normal(size=(B, c)) for c in tc]
    v_t = [np_l2n(rng.random(size=(B, hw, hw))).reshape(B, hw, hw) for hw in (4, 2)]
    got = afd([t64(f) for f in fs], [t64(g) for g in g_t], [t64(v) for v in v_t])
    P = {k: v.detach().numpy() for k, v in afd.state_dict().items()}

    def lin_bn(x: np.ndarray, pre: str, lin: str, bn: str) -> np.ndarray:
        y = x @ P[f"{pre}.{lin}.weight"].T + P[f"{pre}.{lin}.bias"]
        return np_bn(y, P[f"{pre}.{bn}.weight"], P[f"{pre}.{bn}.bias"])

    q = np.stack([lin_bn(g, f"query.{i}", "0", "1") for i, g in enumerate(g_t)], 1)  # (B,T,d)
    k = np.stack([np.maximum(lin_bn(f.mean((2, 3)), f"key.{i}", "0", "1"), 0) for i, f in enumerate(fs)], 1)
    bk = lin_bn(k.reshape(B * 3, d), "bilinear", "0", "1").reshape(B, 3, 2, d)  # (B,S,T,d)
    logit = np.zeros((B, 2, 3))
    for t in range(2):
        for s in range(3):
            logit[:, t, s] = (bk[:, s, t] * q[:, t]).sum(1) + P["p_t"][t] @ P["p_s"][s]
    logit /= np.sqrt(d)
    att = np.exp(logit - logit.max(2, keepdims=True))
    att /= att.sum(2, keepdims=True)
    ref = 0.0
    for t, v in enumerate(v_t):
        hw = v.shape[-1]
        for s, f in enumerate(fs):
            sm = np_l2n(np_area_pool((f**2).mean(1), hw, hw))
            diff = ((sm - v.reshape(B, -1)) ** 2).mean(1)
            ref += (att[:, t, s] * diff).mean()
    assert got.item() == pytest.approx(ref, rel=RTOL)
    np.testing.assert_allclose(afd.last_attention.numpy(), att, rtol=1e-9)
    np.testing.assert_allclose(afd.last_attention.sum(2).numpy(), 1.0, rtol=1e-12)
    got.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in afd.parameters())


def test_parse_method_defaults_and_overrides() -> None:
    cases = {
        "ce": {"ce": 1},
        "kd": {"ce": 0.1, "kd": 0.9},
        "at": {"ce": 1, "at": 1000},
        "at+kd": {"ce": 0.1, "kd": 0.9, "at": 1000},
        "dct": {"ce": 1, "dct": 1},
        "dct+kd": {"ce": 0.1, "kd": 1, "dct": 1},
        "afd": {"ce": 1, "afd": 200},
        "kd+afd": {"ce": 1, "kd": 0.9, "afd": 200},
    }
    for spec, w in cases.items():
        assert parse_method(spec).weights == pytest.approx(w), spec
    m = parse_method("at+kd", {"ce": 1, "kd": 0.5})
    assert m.weights == {"ce": 1, "kd": 0.5, "at": 1000}
    assert parse_method("at+kd").required_targets == {"logits", "at"}
    assert parse_method("afd").required_targets == {"at", "pooled"}
    assert parse_method("dct").required_targets == {"dct"}
    for bad in ("at+foo", ""):
        with pytest.raises(KdpipeError, match="unknown method term"):
            parse_method(bad)
    with pytest.raises(KdpipeError, match="unknown loss weight"):
        parse_method("kd", {"kdd": 1})


def test_method_total_is_weighted_sum_and_checks_tap_counts() -> None:
    z, zt = rng.normal(size=(4, 3)), rng.normal(size=(4, 3))
    y = torch.tensor([0, 1, 2, 0])
    fs = [t64(rng.normal(size=(4, 2, 4, 4)))]
    teacher = {"logits": t64(zt), "at.0": t64(np_l2n(rng.random(size=(4, 4, 4))).reshape(4, 4, 4))}
    m = parse_method("at+kd")
    total, terms = m(t64(z), y, fs, teacher)
    assert terms["ce"] == pytest.approx(ce_loss(t64(z), y).item(), rel=1e-12)
    assert total.item() == pytest.approx(
        0.1 * terms["ce"] + 0.9 * terms["kd"] + 1000 * terms["at"], rel=1e-12
    )
    with pytest.raises(KdpipeError, match="pairs student tap"):
        m(t64(z), y, fs + fs, teacher)
    afd = parse_method("afd+kd")
    assert afd.needs_build
    afd.build([2], [2])
    afd.double()
    teacher["pooled.0"] = t64(rng.normal(size=(4, 2)))
    total, terms = afd(t64(z), y, fs, teacher)
    assert set(terms) == {"ce", "kd", "afd", "total"} and len(afd.extra_modules()) == 1
