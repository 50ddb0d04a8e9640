"""A run from the cache equals the same run with the teacher online, step by step.

Same seed, same views, same student: the only difference is where the teacher targets come from (the
cache on disk vs onnxruntime on the replayed view of every batch). With a float32 cache the per-step
losses agree to float rounding; with a float16 cache to the storage precision.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from _distill import cached, distill_args, read_jsonl, run_ok, teacher

STEPS = {"KDPIPE_LOG_STEPS": "1"}


def _losses(out: Path) -> dict[str, np.ndarray]:
    recs = read_jsonl(out / "steps.jsonl")
    assert [(r["epoch"], r["step"]) for r in recs] == [(e, s) for e in range(2) for s in range(4)]
    return {
        k: np.array([r[k] for r in recs], dtype=np.float64)
        for k in recs[0]
        if k not in ("epoch", "step", "seconds")
    }


def _pair(
    tmp_path: Path,
    method: str,
    dtype: str,
    workers: str = "0",
    lr: str = "0.05",
    targets: str = "logits,at,dct,pooled",
    extra: tuple[str, ...] = (),
) -> tuple[dict, dict]:
    # 2 epochs x 4 steps: with 2 views every sample is seen in both of its views
    common = ["--method", method, "--no-export", "--seed", "3", "--lr", lr, *extra]
    cached_out, online_out = tmp_path / "cached", tmp_path / "online"
    args = distill_args(cached_out, *common, cache_path=cached(2, dtype, targets), epochs=2)
    args[args.index("--workers") + 1] = workers
    run_ok(args, STEPS)
    run_ok(
        distill_args(online_out, *common, "--online-teacher", teacher(), "--views", "2", epochs=2),
        STEPS,
    )
    return _losses(cached_out), _losses(online_out)


@pytest.mark.parametrize("method", ["at", "dct", "afd+kd", "kd"])
def test_float32_cache_equals_online_teacher(tmp_path: Path, method: str) -> None:
    # one of the runs reads the cache through a DataLoader worker process: same numbers
    a, b = _pair(tmp_path, method, "float32", workers="1" if method == "at" else "0")
    assert set(a) == set(b) and "loss" in a
    for term in a:
        np.testing.assert_allclose(a[term], b[term], rtol=1e-5, atol=1e-7, err_msg=term)
    assert np.all(np.isfinite(a["loss"]))


@pytest.mark.parametrize(("method", "extra"), [("grad-at", ()), ("grad-at+at", ("--flip-symmetry",))])
def test_grad_at_cache_equals_online_teacher(tmp_path: Path, method: str, extra: tuple[str, ...]) -> None:
    # the cached J_T (cache-teacher --targets grad, float32) and the online replica's J_T, per step
    a, b = _pair(tmp_path, method, "float32", targets="logits,at,grad", extra=extra)
    assert set(a) == set(b) and "grad-at" in a and ("flip" in a) == bool(extra)
    for term in a:
        np.testing.assert_allclose(a[term], b[term], rtol=1e-5, atol=1e-7, err_msg=term)
    assert np.all(np.isfinite(a["loss"])) and np.all(a["grad-at"] > 0)


@pytest.mark.parametrize("method", ["at", "dct+kd"])
def test_float16_cache_within_storage_precision(tmp_path: Path, method: str) -> None:
    # With --lr 0 every step sees the same weights, so the losses differ only by the float16 rounding
    # of the targets (with lr > 0 the two trajectories drift apart by chaos, not by the cache).
    a, b = _pair(tmp_path, method, "float16", lr="0")
    for term in a:
        np.testing.assert_allclose(a[term], b[term], rtol=1e-3, atol=1e-6, err_msg=term)
    assert np.ptp(a["loss"]) > 0  # the steps did see different batches and views


def test_teacher_card_reaches_the_online_teacher(tmp_path: Path) -> None:
    # A non-default card changes the teacher's (and so the student's) input normalisation: the online
    # run must use the same card as cache-teacher, or the targets differ (a bug that once slipped by
    # because both sides used the default preprocessing).
    card = tmp_path / "card.yaml"
    card.write_text("scale: 1/255\nmean: [0.5]\nstd: [0.25]\n")
    cache = cached(views=2, dtype="float32", card=str(card))
    common = ["--method", "at+kd", "--no-export", "--seed", "3"]
    run_ok(distill_args(tmp_path / "c", *common, cache_path=cache, epochs=2), STEPS)
    run_ok(
        distill_args(
            tmp_path / "o",
            *common,
            "--online-teacher",
            teacher(),
            "--teacher-card",
            str(card),
            "--views",
            "2",
            epochs=2,
        ),
        STEPS,
    )
    a, b = _losses(tmp_path / "c"), _losses(tmp_path / "o")
    for term in a:
        np.testing.assert_allclose(a[term], b[term], rtol=1e-5, atol=1e-7, err_msg=term)
    # and without the card the online run is a different run
    run_ok(
        distill_args(tmp_path / "n", *common, "--online-teacher", teacher(), "--views", "2", epochs=2), STEPS
    )
    assert not np.allclose(_losses(tmp_path / "n")["loss"], a["loss"], rtol=1e-3)
