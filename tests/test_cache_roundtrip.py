"""Cache round trip: bytes on disk re-read with plain np.load, reader API, manifest checks."""

from __future__ import annotations

import json

import numpy as np
import pytest
from test_cache_support import decoded, expected_stored, make_manifest, write_shard

import kdpipe.cache as kc
from kdpipe.errors import KdpipeError


def _npy(path, name, shard="00000-of-00001"):
    return path / "shards" / shard / f"{name}.npy"


def test_every_dtype_round_trips_through_plain_numpy(tmp_path):
    m = make_manifest(num_samples=37, num_views=3, chunk_size=8)
    write_shard(str(tmp_path / "c"), m, (0, 1))
    for name in m["arrays"]:
        on_disk = np.load(_npy(tmp_path / "c", name))  # NumPy alone, no kdpipe
        want = expected_stored(m, name)
        assert on_disk.dtype == want.dtype and on_disk.shape == want.shape, name
        np.testing.assert_array_equal(on_disk, want, err_msg=name)
    stored = json.loads((tmp_path / "c" / "manifest.json").read_text())
    assert stored["teacher"] == m["teacher"] and stored["num_chunks"] == 5 and stored["format_version"] == 1


def test_reader_targets_gather_labels(tmp_path):
    m = make_manifest(num_samples=30, num_views=2, chunk_size=7)
    write_shard(str(tmp_path / "c"), m, (0, 1))
    c = kc.open(tmp_path / "c")
    assert len(c) == 30 and c.num_views == 2 and c.complete and c.taps == ["layer1", "layer2"]
    assert isinstance(c.targets("at", tap="layer1"), np.memmap)
    np.testing.assert_array_equal(c.targets("at", tap="layer2"), expected_stored(m, "at.1"))
    np.testing.assert_array_equal(c.targets("pooled", tap=1), expected_stored(m, "pooled.1"))
    np.testing.assert_array_equal(c.targets("dct"), expected_stored(m, "dct.dft-abs.0"))  # only variant/tap
    np.testing.assert_array_equal(c.targets("logits"), expected_stored(m, "logits"))
    np.testing.assert_array_equal(c.labels, expected_stored(m, "labels"))
    assert c.labels.dtype == np.int64
    np.testing.assert_array_equal(c.view_params, expected_stored(m, "view_params"))
    s = np.array([29, 0, 5, 5, 17])
    v = np.array([1, 0, 1, 0, 1])
    for name in ("logits", "at.0", "dct.dft-abs.0", "pooled.1"):
        got = c.gather(name, s, v)
        assert got.dtype == np.float32
        np.testing.assert_array_equal(got, decoded(m, name)[s, v], err_msg=name)
    np.testing.assert_array_equal(c.gather("labels", s), expected_stored(m, "labels")[s])
    with pytest.raises(KdpipeError, match="several taps"):
        c.targets("at")
    with pytest.raises(KdpipeError, match="no tap 'nope'"):
        c.targets("at", tap="nope")
    with pytest.raises(KdpipeError, match="no DCT variant 'dct2'.*dft-abs"):
        c.targets("dct", variant="dct2")
    assert kc.verify(tmp_path / "c") == []
    inf = kc.info(tmp_path / "c")
    assert inf["complete"] and inf["num_samples"] == 30 and inf["arrays"]["at.0"]["shape"] == [30, 2, 3, 4]


def test_resume_of_a_finished_cache_is_a_no_op(tmp_path):
    m = make_manifest(num_samples=20, num_views=1, chunk_size=6)
    write_shard(str(tmp_path / "c"), m, (0, 1))
    before = (tmp_path / "c" / "shards" / "00000-of-00001" / "journal.jsonl").read_bytes()
    w = kc.create_or_resume(tmp_path / "c", m, (0, 1))
    assert w.pending_chunks() == [] and w.complete
    w.finish()
    assert (tmp_path / "c" / "shards" / "00000-of-00001" / "journal.jsonl").read_bytes() == before


def test_different_manifest_is_refused_naming_the_keys(tmp_path):
    m = make_manifest()
    write_shard(str(tmp_path / "c"), m, (0, 1))
    other = make_manifest(teacher={"sha256": "ef" * 32})
    with pytest.raises(KdpipeError, match=r"teacher/sha256.*another --out folder or delete"):
        kc.create_or_resume(tmp_path / "c", other, (0, 1))
    other = make_manifest()
    other["arrays"]["at.0"]["dtype"] = "float32"
    with pytest.raises(KdpipeError, match=r"arrays/at.0/dtype"):
        kc.create_or_resume(tmp_path / "c", other, (0, 1))
    # the free-form run section is not configuration
    same = make_manifest(run={"host": "elsewhere", "command": "kdpipe cache-teacher ..."})
    kc.create_or_resume(tmp_path / "c", same, (0, 1)).close()


def test_other_shard_count_and_foreign_folder_refused(tmp_path):
    m = make_manifest()
    kc.create_or_resume(tmp_path / "c", m, (0, 2)).close()
    with pytest.raises(KdpipeError, match=r"2 shard\(s\).*--shard k/2"):
        kc.create_or_resume(tmp_path / "c", m, (0, 3))
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("x")
    with pytest.raises(KdpipeError, match="not empty and holds no kdpipe cache"):
        kc.create_or_resume(tmp_path / "junk", m)
    with pytest.raises(KdpipeError, match="does not exist"):
        kc.open(tmp_path / "nothing")


def test_write_chunk_checks_shapes_and_names(tmp_path):
    from test_cache_support import chunk_arrays

    m = make_manifest(num_samples=10, chunk_size=4)
    w = kc.create_or_resume(tmp_path / "c", m)
    arrays = chunk_arrays(m, 0, 4)
    with pytest.raises(ValueError, match="shape"):
        w.write_chunk(0, {**arrays, "logits": arrays["logits"][:3]})
    with pytest.raises(ValueError, match="missing"):
        w.write_chunk(0, {k: v for k, v in arrays.items() if k != "labels"})
    with pytest.raises(OverflowError):
        w.write_chunk(0, {**arrays, "at.0": arrays["at.0"] * 1e6})
    with pytest.raises(KdpipeError, match=r"3 chunk\(s\) not written"):
        w.finish()
    w.close()
