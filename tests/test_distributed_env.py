"""Shard and rank discovery from the environments Slurm, Kubernetes and torchrun really set."""

import numpy as np
import pytest

from kdpipe.batches import epoch_order, epoch_views, rank_batches
from kdpipe.distributed import discover_shard, discover_world, parse_shard
from kdpipe.errors import KdpipeError


def test_flag_wins_over_environment():
    s = discover_shard("2/5", env={"SLURM_ARRAY_TASK_ID": "0", "SLURM_ARRAY_TASK_COUNT": "3"})
    assert (s.index, s.count, s.source) == (2, 5, "--shard")


def test_slurm_array_with_offset_range():
    env = {"SLURM_ARRAY_TASK_ID": "12", "SLURM_ARRAY_TASK_MIN": "10", "SLURM_ARRAY_TASK_COUNT": "4"}
    s = discover_shard(None, env=env)
    assert (s.index, s.count, s.source) == (2, 4, "slurm")


def test_kubernetes_indexed_job_needs_count():
    s = discover_shard(None, env={"JOB_COMPLETION_INDEX": "3", "KDPIPE_NUM_SHARDS": "8"})
    assert (s.index, s.count, s.source) == (3, 8, "kubernetes")
    with pytest.raises(KdpipeError, match="KDPIPE_NUM_SHARDS"):
        discover_shard(None, env={"JOB_COMPLETION_INDEX": "3"})


def test_single_process_default_and_bad_flags():
    assert (discover_shard(None, env={}).index, discover_shard(None, env={}).count) == (0, 1)
    for bad in ("3/3", "-1/2", "a/b", "1"):
        with pytest.raises(KdpipeError, match="--shard"):
            parse_shard(bad)


def test_torchrun_world():
    w = discover_world({"RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "2"})
    assert (w.rank, w.world_size, w.distributed, w.is_main) == (1, 2, True, False)
    assert not discover_world({}).distributed


def test_epoch_order_is_a_fixed_permutation_per_epoch():
    a, b = epoch_order(7, 3, 100), epoch_order(7, 3, 100)
    assert np.array_equal(a, b) and np.array_equal(np.sort(a), np.arange(100))
    assert not np.array_equal(a, epoch_order(7, 4, 100))


def test_every_view_used_once_per_k_epochs():
    k, n = 4, 50
    samples = np.arange(n)
    seen = np.stack([epoch_views(1, e, samples, k) for e in range(k)])  # (K epochs, N)
    assert np.array_equal(np.sort(seen, axis=0), np.tile(np.arange(k)[:, None], (1, n)))
    # the view of a sample does not depend on the order it is asked in
    perm = np.random.default_rng(0).permutation(n)
    assert np.array_equal(epoch_views(1, 2, perm, k), epoch_views(1, 2, samples, k)[perm])


def test_rank_batches_partition_without_overlap():
    order = np.arange(103)
    parts = [rank_batches(order, 10, r, 2) for r in range(2)]
    assert len(parts[0]) == len(parts[1]) == 5
    flat = np.concatenate([b for p in parts for b in p])
    assert len(np.unique(flat)) == 100
