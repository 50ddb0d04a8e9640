"""TeacherSpec: YAML teacher cards, flags, round trips, and the preprocessing they produce."""

from __future__ import annotations

import _models as M
import numpy as np
import pytest

from kdpipe.errors import KdpipeError
from kdpipe.teacher import TeacherSpec, from_flags, load_card, load_teacher, spec_for


@pytest.fixture(scope="module")
def nchw():
    return load_teacher(M.export("resnet", "legacy", True))


@pytest.fixture(scope="module")
def nhwc():
    return load_teacher(M.export("nhwc", "legacy", True))


def _images(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (2, M.SIZE, M.SIZE, 3), dtype=np.uint8)


def test_card_gives_expected_input(tmp_path, nchw):
    card = tmp_path / "teacher.yaml"
    card.write_text(
        "input_size: [8, 8]\nscale: 1/255\nmean: [0.5, 0.4, 0.3]\nstd: [0.2, 0.25, 0.3]\nchannel_order: bgr\n"
    )
    spec = load_card(str(card), nchw)
    assert spec.size == (8, 8) and spec.layout == "NCHW"
    img = _images()
    x = spec(img)
    bgr = img[..., ::-1].astype(np.float64) / 255.0
    ref = ((bgr - [0.5, 0.4, 0.3]) / [0.2, 0.25, 0.3]).transpose(0, 3, 1, 2)
    assert x.dtype == np.float32 and x.shape == (2, 3, 8, 8)
    np.testing.assert_allclose(x, ref, atol=1e-5)
    again = TeacherSpec.from_dict(spec.to_dict())
    assert again == spec


def test_layout_comes_from_the_graph(nhwc):
    spec = from_flags(nhwc, scale=1, mean=0.5, std=2)
    img = _images(1)
    x = spec(img)
    assert spec.layout == "NHWC" and x.shape == (2, 8, 8, 3)
    np.testing.assert_allclose(x, (img.astype(np.float64) - 0.5) / 2, atol=1e-5)


def test_card_errors(tmp_path, nchw):
    bad = tmp_path / "bad.yaml"
    bad.write_text("input_size: 8\nmeans: [0.5]\ncolour: rgb\n")
    with pytest.raises(KdpipeError, match="colour") as e:
        load_card(str(bad), nchw)
    assert "means" in str(e.value)
    size = tmp_path / "size.yaml"
    size.write_text("input_size: [16, 16]\n")
    with pytest.raises(KdpipeError, match="differs"):
        load_card(str(size), nchw)
    with pytest.raises(KdpipeError, match="does not exist"):
        load_card(str(tmp_path / "nope.yaml"), nchw)
    notmap = tmp_path / "list.yaml"
    notmap.write_text("- 1\n- 2\n")
    with pytest.raises(KdpipeError, match="mapping"):
        load_card(str(notmap), nchw)
    with pytest.raises(KdpipeError, match="scale"):
        from_flags(nchw, scale="1/zero")
    with pytest.raises(KdpipeError):
        from_flags(nchw, mean=[0.1, 0.2])


def test_wrong_image_size(nchw):
    spec = from_flags(nchw)
    with pytest.raises(KdpipeError, match="pixels"):
        spec(np.zeros((1, 9, 9, 3), np.uint8))


def test_spec_for_card_metadata_and_overrides(tmp_path, nchw):
    card = tmp_path / "c.yaml"
    card.write_text("scale: 1\nmean: [1, 2, 3]\nstd: 4\n")
    spec = spec_for(nchw, card=str(card), channel_order="bgr")
    assert spec.normalize.mean == (1.0, 2.0, 3.0) and spec.normalize.std == (4.0,)
    assert spec.normalize.channel_order == "bgr" and spec.normalize.scale == 1.0
    img = _images(2)
    np.testing.assert_array_equal(spec.preprocess(img), spec(img))
    default = spec_for(nchw)
    assert default.size == (8, 8) and abs(default.normalize.scale - 1 / 255) < 1e-12
    with pytest.raises(KdpipeError, match="unknown settings"):
        spec_for(nchw, colour="rgb")

    import json

    import onnx

    m = onnx.load(nchw.path)
    onnx.helper.set_model_props(m, {"kdpipe.preprocess": json.dumps(spec.to_dict())})
    path = tmp_path / "student.onnx"
    onnx.save(m, str(path))
    assert spec_for(load_teacher(str(path))) == spec
