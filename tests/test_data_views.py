"""Replayable views: counter-based parameters and their application."""

import numpy as np
import pytest
import torch

from kdpipe.data.views import VIEW_FIELDS, ViewPolicy, apply_views, draw_view_params
from kdpipe.errors import KdpipeError

PAD_CROP = ViewPolicy("pad-crop", size=32, pad=4, pad_mode="reflect")
RRC = ViewPolicy("rrc", size=24)


def _grid(n_samples: int, n_views: int, shape=(32, 32)):
    samples = np.repeat(np.arange(n_samples, dtype=np.int64), n_views)
    views = np.tile(np.arange(n_views, dtype=np.int64), n_samples)
    sizes = np.tile(np.array(shape, np.int32), (len(samples), 1))
    return samples, views, sizes


@pytest.mark.parametrize("policy", [PAD_CROP, RRC])
def test_params_independent_of_batching_and_rerun(policy):
    samples, views, sizes = _grid(200, 4)
    full = draw_view_params(policy, 7, samples, views, sizes)
    assert full.dtype == np.int32 and full.shape == (800, len(VIEW_FIELDS))
    assert np.array_equal(full, draw_view_params(policy, 7, samples, views, sizes))
    rng = np.random.default_rng(1)
    perm = rng.permutation(len(samples))
    cuts = np.sort(rng.choice(np.arange(1, len(samples)), 9, replace=False))
    pieces = [draw_view_params(policy, 7, samples[p], views[p], sizes[p]) for p in np.split(perm, cuts)]
    regrouped = np.empty_like(full)
    regrouped[perm] = np.concatenate(pieces)
    assert np.array_equal(regrouped, full)
    one = np.stack(
        [
            draw_view_params(policy, 7, samples[i : i + 1], views[i : i + 1], sizes[i : i + 1])[0]
            for i in range(0, 800, 97)
        ]
    )
    assert np.array_equal(one, full[::97])
    assert not np.array_equal(full, draw_view_params(policy, 8, samples, views, sizes))


def test_golden_values():
    """Pinned numbers: the same on every machine and NumPy version."""
    samples = np.array([0, 1, 999999, 5])
    views = np.array([0, 3, 7, -1])
    sizes = np.array([[32, 32], [32, 32], [40, 60], [32, 32]])
    assert draw_view_params(PAD_CROP, 12345, samples, views, sizes).tolist() == [
        [8, 8, 32, 32, 0],
        [0, 5, 32, 32, 0],
        [5, 30, 32, 32, 0],
        [4, 4, 32, 32, 0],
    ]
    assert draw_view_params(RRC, 12345, samples, views, sizes).tolist() == [
        [16, 18, 16, 14, 0],
        [0, 4, 22, 26, 0],
        [4, 22, 27, 34, 0],
        [0, 0, 32, 32, 0],
    ]


def test_pad_crop_bounds_and_flips():
    samples, views, sizes = _grid(300, 2)
    p = draw_view_params(PAD_CROP, 0, samples, views, sizes)
    assert (p[:, 0] >= 0).all() and (p[:, 0] <= 8).all() and (p[:, 1] >= 0).all() and (p[:, 1] <= 8).all()
    assert (p[:, 2:4] == 32).all()
    assert set(p[:, 0].tolist()) == set(range(9))
    assert set(p[:, 4].tolist()) == {0, 1}
    noflip = ViewPolicy("pad-crop", size=32, flip=False)
    assert (draw_view_params(noflip, 0, samples, views, sizes)[:, 4] == 0).all()


def test_rrc_bounds():
    samples, views, sizes = _grid(500, 2, shape=(40, 60))
    p = draw_view_params(RRC, 3, samples, views, sizes).astype(np.int64)
    y0, x0, h, w, f = p.T
    assert (y0 >= 0).all() and (x0 >= 0).all() and (h >= 1).all() and (w >= 1).all()
    assert (y0 + h <= 40).all() and (x0 + w <= 60).all()
    frac = h * w / (40 * 60)
    assert frac.min() >= 0.05 and frac.max() <= 1.0
    aspect = w / h
    assert aspect.min() > 0.6 and aspect.max() < 1.6
    assert set(f.tolist()) == {0, 1}
    assert len(set(map(tuple, p[:, :4].tolist()))) > 400  # varied boxes


def test_plain_view():
    sizes = np.array([[30, 20], [32, 32]])
    for pol, off in [(PAD_CROP, 4), (RRC, 0), (ViewPolicy("none", size=32), 0)]:
        p = draw_view_params(pol, 1, np.array([3, 4]), np.array([-1, -1]), sizes)
        assert p.tolist() == [[off, off, 30, 20, 0], [off, off, 32, 32, 0]]
    p = draw_view_params(ViewPolicy("none", size=32), 1, np.array([3]), np.array([5]), sizes[1:])
    assert p.tolist() == [[0, 0, 32, 32, 0]]
    img = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    out = apply_views(
        img,
        draw_view_params(PAD_CROP, 1, np.array([0, 1]), np.array([-1, -1]), np.array([[32, 32]] * 2)),
        PAD_CROP,
    )
    assert np.array_equal(out, img)


@pytest.mark.parametrize("mode", ["reflect", "constant"])
def test_pad_crop_apply_matches_reference(mode):
    policy = ViewPolicy("pad-crop", size=32, pad=4, pad_mode=mode)
    rng = np.random.default_rng(2)
    imgs = rng.integers(0, 256, (64, 32, 32, 3), dtype=np.uint8)
    samples, views, sizes = _grid(64, 1)
    params = draw_view_params(policy, 5, samples, views, sizes)
    out = apply_views(imgs, params, policy)
    assert out.shape == (64, 32, 32, 3) and out.dtype == np.uint8
    for b in range(64):
        y0, x0, h, w, f = params[b]
        if mode == "reflect":
            padded = np.pad(imgs[b], ((4, 4), (4, 4), (0, 0)), mode="reflect")
        else:
            padded = np.pad(imgs[b], ((4, 4), (4, 4), (0, 0)))
        ref = padded[y0 : y0 + h, x0 : x0 + w]
        if f:
            ref = ref[:, ::-1]
        assert np.array_equal(out[b], ref)
    # a list of images gives the same result as the batch array
    assert np.array_equal(apply_views(list(imgs[:5]), params[:5], policy), out[:5])


def test_rrc_apply_shape_determinism_and_list():
    rng = np.random.default_rng(3)
    imgs = rng.integers(0, 256, (16, 40, 60, 1), dtype=np.uint8)
    samples, views, sizes = _grid(16, 1, shape=(40, 60))
    params = draw_view_params(RRC, 9, samples, views, sizes)
    a = apply_views(imgs, params, RRC)
    assert a.shape == (16, 24, 24, 1) and a.dtype == np.uint8
    assert np.array_equal(a, apply_views(imgs.copy(), params.copy(), RRC))
    assert np.array_equal(apply_views(list(imgs), params, RRC), a)
    # mixed sizes through the list path
    mixed = [imgs[0], imgs[1, :30, :50]]
    p2 = draw_view_params(RRC, 9, np.array([0, 1]), np.array([0, 0]), np.array([[40, 60], [30, 50]]))
    assert apply_views(mixed, p2, RRC).shape == (2, 24, 24, 1)


def test_rrc_crop_resize_matches_independent_reference():
    """Crop + flip with numpy slicing, then torch's bilinear (half-pixel, no antialias): equal up to 1."""
    rng = np.random.default_rng(4)
    imgs = rng.integers(0, 256, (32, 40, 60, 3), dtype=np.uint8)
    samples, views, sizes = _grid(32, 1, shape=(40, 60))
    policy = ViewPolicy("rrc", size=48)
    params = draw_view_params(policy, 11, samples, views, sizes)
    out = apply_views(imgs, params, policy).astype(np.int64)
    for b in range(32):
        y0, x0, h, w, f = params[b]
        crop = imgs[b, y0 : y0 + h, x0 : x0 + w].astype(np.float64)
        t = torch.from_numpy(crop).permute(2, 0, 1)[None]
        r = torch.nn.functional.interpolate(t, size=(48, 48), mode="bilinear", align_corners=False)
        ref = r[0].permute(1, 2, 0).numpy()
        if f:
            ref = ref[:, ::-1]
        assert np.abs(out[b] - ref).max() <= 0.5 + 1e-3


def test_policy_dict_and_errors():
    for p in (PAD_CROP, RRC, ViewPolicy("none", size=16, flip=False)):
        assert ViewPolicy.from_dict(p.to_dict()) == p
    with pytest.raises(KdpipeError):
        ViewPolicy("random", size=32)
    with pytest.raises(KdpipeError):
        ViewPolicy("rrc", size=32, scale=(0.5, 0.1))
    with pytest.raises(KdpipeError):
        ViewPolicy.from_dict({"kind": "rrc", "sizes": 3})
    with pytest.raises(KdpipeError):  # 8 + 2*4 < 32
        draw_view_params(PAD_CROP, 0, np.array([0]), np.array([0]), np.array([[8, 8]]))


@pytest.mark.parametrize("size", [24, 48, 97])  # shrink, mixed, enlarge (boxes of 1..60 px)
def test_native_resize_bit_identical_to_numpy(size):
    """The native blend and the NumPy formula give the same bytes, flips and edge rows included."""
    from kdpipe import ops
    from kdpipe.data.transforms import crop_resize_batch

    if not ops.native_available():
        pytest.skip("kdpipe._native is not built")
    rng = np.random.default_rng(size)
    imgs = rng.integers(0, 256, (64, 40, 60, 3), dtype=np.uint8)
    h = rng.integers(1, 41, 64)
    w = rng.integers(1, 61, 64)
    y0 = rng.integers(0, 41 - h)
    x0 = rng.integers(0, 61 - w)
    flip = rng.integers(0, 2, 64)
    native = crop_resize_batch(imgs, y0, x0, h, w, flip, size)
    numpy = crop_resize_batch(imgs, y0, x0, h, w, flip, size, native=False)
    assert native.shape == (64, size, size, 3) and native.tobytes() == numpy.tobytes()
