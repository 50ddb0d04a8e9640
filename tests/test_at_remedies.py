"""AT's remedies (per-tap weights, a term warm-up), the pre-activation student taps and the train
top-1 record, against float64 NumPy formulas and an own forward of the block."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from _distill import cached, distill_args, read_jsonl, run_cli, run_ok

from kdpipe.errors import KdpipeError
from kdpipe.losses import at_loss, parse_method
from kdpipe.student import StudentTaps, create_model

rng = np.random.default_rng(16)


def t64(a: np.ndarray) -> torch.Tensor:
    return torch.tensor(a, dtype=torch.float64)


def np_at_map(f: np.ndarray, h: int) -> np.ndarray:
    """l2n(area-pool(mean_c F**2)) of (B,C,H,W) -> (B, h*h)."""
    e = (f**2).mean(1)
    b, hh, _ = e.shape
    e = e.reshape(b, h, hh // h, h, hh // h).mean(axis=(2, 4)).reshape(b, -1)
    return e / np.maximum(np.sqrt((e * e).sum(1, keepdims=True)), 1e-12)


def test_tap_weights_multiply_each_taps_term() -> None:
    fs = [rng.normal(size=(3, 4, 8, 8)), rng.normal(size=(3, 6, 4, 4)), rng.normal(size=(3, 2, 2, 2))]
    vt = [np_at_map(rng.normal(size=(3, 5, s, s)), s) for s in (8, 4, 2)]
    w = [1.0, 0.25, 0.0625]
    sides = (8, 4, 2)
    ref = sum(wi * ((np_at_map(f, s) - v) ** 2).mean() for wi, f, v, s in zip(w, fs, vt, sides, strict=True))
    maps = [t64(v.reshape(3, s, s)) for v, s in zip(vt, sides, strict=True)]
    assert at_loss([t64(f) for f in fs], maps, w).item() == pytest.approx(ref, rel=1e-10)
    m = parse_method("at", at_tap_weights=w)
    y = torch.tensor([0, 1, 0])
    z = t64(rng.normal(size=(3, 2)))
    teacher = {f"at.{i}": maps[i] for i in range(3)}
    total, terms = m(z, y, [t64(f) for f in fs], teacher)
    assert terms["at"] == pytest.approx(ref, rel=1e-10)
    assert total.item() == pytest.approx(terms["ce"] + 1000 * ref, rel=1e-10)
    with pytest.raises(KdpipeError, match="2 weight"):
        parse_method("at", at_tap_weights=[1, 2])(z, y, [t64(f) for f in fs], teacher)


def test_warmup_ramps_the_weight_linearly() -> None:
    m = parse_method("at+kd", warmup={"at": 10.0})
    z, zt = t64(rng.normal(size=(4, 3))), t64(rng.normal(size=(4, 3)))
    y = torch.tensor([0, 1, 2, 0])
    fs = [t64(rng.normal(size=(4, 2, 4, 4)))]
    teacher = {"logits": zt, "at.0": t64(np_at_map(rng.normal(size=(4, 3, 4, 4)), 4).reshape(4, 4, 4))}
    for progress, scale in ((0.0, 0.0), (2.5, 0.25), (10.0, 1.0), (17.0, 1.0)):
        m.progress = progress
        total, terms = m(z, y, fs, teacher)
        want = 0.1 * terms["ce"] + 0.9 * terms["kd"] + 1000 * scale * terms["at"]
        assert total.item() == pytest.approx(want, rel=1e-12), progress
    assert "ramped over 10 epochs" in m.describe()


def test_remedy_options_refuse_bad_input() -> None:
    with pytest.raises(KdpipeError, match="has none"):
        parse_method("kd", at_tap_weights=[1.0])
    with pytest.raises(KdpipeError, match="does not have"):
        parse_method("kd", warmup={"at": 5})
    with pytest.raises(KdpipeError, match=">= 0"):
        parse_method("at", warmup={"at": -1})
    with pytest.raises(KdpipeError, match=">= 0"):
        parse_method("at", at_tap_weights=[1.0, float("nan")])


def test_preact_tap_is_the_sum_before_the_last_relu() -> None:
    torch.manual_seed(0)
    model = create_model("resnet8", num_classes=4, in_chans=1).eval()
    taps = StudentTaps(model, ["layer2.0.preact"])
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        model(x)
        b = model.layer2[0]
        h = model.layer1(F.relu(model.bn1(model.conv1(x))))
        want = b.bn2(b.conv2(F.relu(b.bn1(b.conv1(h))))) + b.downsample(h)
    got = taps.features[0]
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    assert float(got.min()) < 0  # really before the ReLU
    torch.testing.assert_close(F.relu(got), b(h), rtol=0, atol=1e-6)


def test_distill_with_remedies_records_train_top1(tmp_path) -> None:
    out = tmp_path / "run"
    run_ok(distill_args(out, "--method", "at", "--at-tap-weights", "1,0.5,0.25", "--term-warmup", "at=2",
                        "--student-taps", "layer1.0.preact,layer2.0.preact,layer3.0.preact",
                        cache_path=cached(2, "float16"), epochs=1))  # fmt: skip
    rec = read_jsonl(out / "metrics.jsonl")[-1]
    assert 0.0 <= rec["train_top1"] <= 100.0 and rec["train_at"] > 0
    r = run_cli(distill_args(tmp_path / "bad", "--method", "at", "--term-warmup", "at=soon",
                             cache_path=cached(2, "float16")))  # fmt: skip
    assert r.exit_code != 0 and "expected TERM=NUMBER" in r.output and "Traceback" not in r.output
    r = run_cli(distill_args(tmp_path / "bad2", "--method", "at", "--at-tap-weights", "1,x",
                             cache_path=cached(2, "float16")))  # fmt: skip
    assert r.exit_code != 0 and "--at-tap-weights" in r.output and "Traceback" not in r.output
