"""Datasets: restricted unpickler, built-ins, .npz files, image folders, fingerprints."""

import gzip
import hashlib
import importlib.util
import io
import os
import pickle
import pickletools
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from kdpipe.data import load_dataset, stratified_split
from kdpipe.data.builtin import ANIMAL_CLASSES, SPLIT_SEED
from kdpipe.data.safe_pickle import RestrictedUnpickler, loads_array
from kdpipe.errors import KdpipeError


# -- restricted unpickler -----------------------------------------------------------------------------
class _Evil:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_unpickler_refuses_os_system(tmp_path):
    marker = tmp_path / "pwned"
    payload = pickle.dumps(_Evil(str(marker)))
    assert any(op.name in ("GLOBAL", "STACK_GLOBAL") for op, _, _ in pickletools.genops(payload))
    with pytest.raises(pickle.UnpicklingError, match="system"):
        loads_array(payload)
    with pytest.raises(pickle.UnpicklingError):
        RestrictedUnpickler(io.BytesIO(payload)).load()
    assert not marker.exists()


def test_unpickler_reads_arrays_refuses_objects():
    a = np.arange(12, dtype=np.int64).reshape(3, 4)
    for proto in (3, 4, 5):
        b = loads_array(pickle.dumps(a, protocol=proto))
        assert b.dtype == a.dtype and np.array_equal(a, b)
    with pytest.raises(pickle.UnpicklingError):
        loads_array(pickle.dumps(np.array([1, "x"], dtype=object)))
    with pytest.raises(pickle.UnpicklingError):
        loads_array(pickle.dumps([1, 2, 3]))


# -- built-ins ------------------------------------------------------------------------------------------
def _raw_animals():
    """Independent re-read of the package files (safe here: the unpickler under test checked them)."""
    root = Path(list(importlib.util.find_spec("animal_shape_mnist").submodule_search_locations)[0])
    folder = root / "data" / "Animal Shape"
    with gzip.open(folder / "animal_data_version_3.gz") as f:
        x = loads_array(f.read())
    with gzip.open(folder / "animal_label_version_3.gz") as f:
        y = loads_array(f.read())
    return x, y


def test_animals_split_is_fixed_stratified_disjoint():
    train, val = load_dataset("animals"), load_dataset("animals:val")
    assert (len(train), len(val)) == (8000, 2000)
    assert train.class_names == ANIMAL_CLASSES and train.num_classes == 10 and train.channels == 1
    assert np.bincount(train.labels).tolist() == [800] * 10
    assert np.bincount(val.labels).tolist() == [200] * 10
    x, y = _raw_animals()
    assert x.shape == (10000, 28, 28) and np.bincount(y).tolist() == [1000] * 10
    tr, va = stratified_split(y, 0.2, SPLIT_SEED)
    assert len(np.intersect1d(tr, va)) == 0 and len(np.union1d(tr, va)) == 10000
    assert np.array_equal(train.load(np.arange(8000))[..., 0], x[tr])
    assert np.array_equal(val.load(np.arange(2000))[..., 0], x[va])
    assert np.array_equal(train.labels, y[tr]) and np.array_equal(val.labels, y[va])
    # pinned: the split never changes
    assert va[:8].tolist() == [5, 9, 14, 17, 19, 22, 30, 32]
    assert hashlib.sha256(va.astype("<i8").tobytes()).hexdigest().startswith("b432c726111c2b61")
    assert (train.sizes() == 28).all() and train.sizes().dtype == np.int32
    assert train.fingerprint() != val.fingerprint()


def test_digits():
    tr, va = load_dataset("digits"), load_dataset("digits:val")
    assert len(tr) + len(va) == 1797 and tr.num_classes == 10 and tr.channels == 1
    x = tr.load(np.array([0, 5]))
    assert x.shape == (2, 32, 32, 1) and x.dtype == np.uint8 and x.max() > 200
    counts = np.bincount(tr.labels) + np.bincount(va.labels)
    np.testing.assert_array_equal(np.bincount(va.labels), np.floor(counts * 0.2 + 0.5))


def test_unknown_spec():
    with pytest.raises(KdpipeError, match="not found"):
        load_dataset("no-such-dataset")


# -- npz --------------------------------------------------------------------------------------------------
def _npz(path, **arrays):
    np.savez(path, **arrays)
    return str(path)


def test_npz_roundtrip_and_val(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (20, 8, 9, 3), dtype=np.uint8)
    y = rng.integers(0, 4, 20)
    xv = rng.integers(0, 256, (6, 8, 9), dtype=np.uint8)
    p = _npz(
        tmp_path / "d.npz",
        x=x,
        y=y,
        x_val=xv,
        y_val=np.arange(6) % 4,
        class_names=np.array(["a", "b", "c", "d"]),
    )
    ds = load_dataset(p)
    assert len(ds) == 20 and ds.channels == 3 and ds.class_names == ["a", "b", "c", "d"]
    assert np.array_equal(ds.load(np.array([3, 1])), x[[3, 1]])
    assert ds.labels.dtype == np.int64 and np.array_equal(ds.labels, y)
    assert ds.sizes().tolist() == [[8, 9]] * 20
    val = load_dataset(p + ":val")
    assert val.channels == 1 and np.array_equal(val.load(np.arange(6))[..., 0], xv)
    assert val.name == "d.npz:val"


@pytest.mark.parametrize(
    "arrays, key",
    [
        (dict(x=np.zeros((4, 5, 5), np.float32), y=np.zeros(4, np.int64)), "'x'"),
        (dict(x=np.zeros((4, 5, 5, 2), np.uint8), y=np.zeros(4, np.int64)), "'x'"),
        (dict(x=np.zeros((4, 5), np.uint8), y=np.zeros(4, np.int64)), "'x'"),
        (dict(x=np.zeros((4, 5, 5), np.uint8), y=np.zeros(3, np.int64)), "'y'"),
        (dict(x=np.zeros((4, 5, 5), np.uint8), y=np.zeros(4, np.float32)), "'y'"),
        (dict(x=np.zeros((4, 5, 5), np.uint8)), "'y'"),
        (dict(x=np.zeros((4, 5, 5), np.uint8), y=np.array([0, 1, 2, -1])), "'y'"),
    ],
)
def test_npz_errors_name_file_and_key(tmp_path, arrays, key):
    p = _npz(tmp_path / "bad.npz", **arrays)
    with pytest.raises(KdpipeError) as e:
        load_dataset(p)
    assert "bad.npz" in str(e.value) and key in str(e.value)


def test_npz_missing_val_and_broken_file(tmp_path):
    p = _npz(tmp_path / "d.npz", x=np.zeros((2, 3, 3), np.uint8), y=np.zeros(2, np.int64))
    with pytest.raises(KdpipeError, match="x_val"):
        load_dataset(p + ":val")
    broken = tmp_path / "broken.npz"
    broken.write_bytes(b"not a zip file")
    with pytest.raises(KdpipeError, match="broken.npz"):
        load_dataset(str(broken))


def test_fingerprint_changes_with_one_label_or_pixel(tmp_path):
    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, (10, 6, 6), dtype=np.uint8)
    y = np.arange(10) % 3
    base = load_dataset(_npz(tmp_path / "a.npz", x=x, y=y)).fingerprint()
    assert base["count"] == 10 and base["num_classes"] == 3
    again = load_dataset(_npz(tmp_path / "b.npz", x=x, y=y)).fingerprint()
    assert {k: v for k, v in again.items() if k != "name"} == {k: v for k, v in base.items() if k != "name"}
    y2 = y.copy()
    y2[4] = (y2[4] + 1) % 3
    fy = load_dataset(_npz(tmp_path / "c.npz", x=x, y=y2)).fingerprint()
    assert fy["labels_sha256"] != base["labels_sha256"] and fy["content_sha256"] == base["content_sha256"]
    x2 = x.copy()
    x2[7, 2, 3] ^= 1
    fx = load_dataset(_npz(tmp_path / "d.npz", x=x2, y=y)).fingerprint()
    assert fx["content_sha256"] != base["content_sha256"] and fx["labels_sha256"] == base["labels_sha256"]


# -- folders ----------------------------------------------------------------------------------------------
def _make_folder(root: Path, rng) -> list[tuple[Path, int]]:
    spec = {
        "cat": [("a.png", (20, 30)), ("b.JPG", (17, 25))],
        "dog": [("c.jpeg", (32, 32)), ("d.PNG", (9, 40))],
    }
    files = []
    for label, (cls, items) in enumerate(sorted(spec.items())):
        (root / cls).mkdir(parents=True)
        for fname, (h, w) in items:
            arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            p = root / cls / fname
            Image.fromarray(arr).save(p, format="JPEG" if fname.lower().endswith(("jpg", "jpeg")) else "PNG")
            files.append((p, label))
    (root / "dog" / "notes.txt").write_text("ignored")
    return files


def test_folder_dataset_decodes_like_pillow(tmp_path):
    files = _make_folder(tmp_path / "imgs", np.random.default_rng(2))
    ds = load_dataset(str(tmp_path / "imgs"))
    assert len(ds) == 4 and ds.class_names == ["cat", "dog"] and ds.channels == 3
    assert ds.labels.tolist() == [lab for _, lab in files]
    expected = [np.asarray(Image.open(p).convert("RGB")) for p, _ in files]
    assert ds.sizes().tolist() == [list(e.shape[:2]) for e in expected]
    got = ds.load(np.array([0, 1, 2, 3]))
    assert isinstance(got, list)
    for g, e in zip(got, expected, strict=True):
        assert g.dtype == np.uint8 and np.array_equal(g, e)
    same = ds.load(np.array([2, 2]))
    assert isinstance(same, np.ndarray) and same.shape == (2, 32, 32, 3)
    fp = ds.fingerprint()
    assert fp["count"] == 4 and fp["num_classes"] == 2
    # growing one file changes the content hash of a fresh dataset object
    with open(files[0][0], "ab") as f:
        f.write(b"\0")
    assert load_dataset(str(tmp_path / "imgs")).fingerprint()["content_sha256"] != fp["content_sha256"]


def test_folder_grey_and_splits(tmp_path):
    rng = np.random.default_rng(3)
    for split, n in (("train", 3), ("val", 2)):
        for cls in ("x", "y"):
            d = tmp_path / "g" / split / cls
            d.mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, (10, 12), dtype=np.uint8)).save(d / f"{i}.png")
    tr, va = load_dataset(str(tmp_path / "g")), load_dataset(str(tmp_path / "g") + ":val")
    assert (len(tr), len(va)) == (6, 4) and tr.channels == 1 and va.class_names == ["x", "y"]
    imgs = va.load(np.arange(4))
    assert imgs.shape == (4, 10, 12, 1)
    ref = np.asarray(Image.open(tmp_path / "g" / "val" / "y" / "1.png"))
    assert np.array_equal(imgs[3, :, :, 0], ref)


def test_folder_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(KdpipeError, match="class sub-folders"):
        load_dataset(str(tmp_path / "empty"))
    (tmp_path / "noimg" / "a").mkdir(parents=True)
    (tmp_path / "noimg" / "a" / "x.txt").write_text("x")
    with pytest.raises(KdpipeError, match="no images"):
        load_dataset(str(tmp_path / "noimg"))
    with pytest.raises(KdpipeError, match="val"):
        load_dataset(str(tmp_path / "noimg") + ":val")
    (tmp_path / "bad" / "a").mkdir(parents=True)
    (tmp_path / "bad" / "a" / "x.png").write_bytes(b"garbage")
    ds = load_dataset(str(tmp_path / "bad"))
    with pytest.raises(KdpipeError, match="x.png"):
        ds.load(np.array([0]))
