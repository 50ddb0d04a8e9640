"""Where a batch's teacher targets come from: the cache (the normal case) or an online onnxruntime
teacher (the baseline the cache replaces). Both sit behind one interface, :class:`TeacherSource`."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from kdpipe.distributed import WorldInfo
from kdpipe.errors import KdpipeError
from kdpipe.gradient import parse_form
from kdpipe.targets import TargetPlan, plan_targets
from kdpipe.train.config import DistillConfig


@dataclass
class TeacherSource:
    """What the student side needs to know about the teacher, and ``targets(batch)``.

    ``chans``/``hw``: channels and (H, W) of each teacher tap; ``num_classes``: 0 when unknown;
    ``policy``/``view_seed``/``num_views``: the views the teacher saw (replayed for the student);
    ``normalize``: the teacher's input normalisation; ``cache``: the opened cache, or None online.
    """

    policy: Any
    normalize: Any
    view_seed: int
    num_views: int
    chans: list[int]
    hw: list[tuple[int, int]]
    num_classes: int
    dct_variants: list[str]
    cache: Any = None
    where: str = ""  # the cache path, for messages
    grad_form: Any = None  # GradForm of the teacher's J_T (grad-at)
    taps: list[dict[str, Any]] = field(default_factory=list)  # name, layout, block of each tap (manifest)
    selected: list[int] | None = None  # the source's taps paired with the student (select); None = all

    @property
    def transformer(self) -> bool:
        """Whether the teacher taps are transformer token tensors (NLC), which pair by even spacing."""
        return any(t.get("layout") == "NLC" for t in self.taps)

    def select(self, indices: list[int]) -> None:
        """Keep only taps ``indices`` (of the current ones) for pairing; their arrays are read under
        their cached names and renamed 0, 1, ... (``TargetPlan.rename``)."""
        base = self.selected if self.selected is not None else list(range(len(self.chans)))
        self.selected = [base[i] for i in indices]
        self.chans = [self.chans[i] for i in indices]
        self.hw = [self.hw[i] for i in indices]
        self.taps = [self.taps[i] for i in indices] if self.taps else []

    @property
    def needs_uint8(self) -> bool:
        """Whether batches must carry the raw uint8 views (the online teacher preprocesses them)."""
        return False

    def plan(self, required: set[str], variant: str) -> TargetPlan:
        """The arrays a method needing target kinds ``required`` reads (and what it derives)."""
        from kdpipe.targets import tap_rename
        from kdpipe.train.model import target_names_for

        read = target_names_for(required, len(self.chans), variant, self.selected)
        return TargetPlan(read, rename=tap_rename(read, self.selected) if self.selected else {})

    def derives_dct(self) -> bool:
        """Whether any DCT variant can be derived from the source's at maps."""
        return False

    def check_targets(self, names: list[str], method: str, required: set[str]) -> None:
        """Refuse a method whose targets this source cannot give (nothing to check online)."""

    def verify(self, names: list[str], enabled: bool, world: WorldInfo, log: Any) -> None:
        """Check the stored bytes of arrays ``names`` before training (nothing to check online)."""

    def targets(self, batch: dict[str, Any], names: list[str]) -> dict[str, torch.Tensor]:
        """The targets of one batch: array name -> float32 tensor (B, ...), on the host."""
        return batch["targets"]


def open_cache(cfg: DistillConfig) -> tuple[Any, Any]:
    """Open the complete cache ``cfg.cache`` and the dataset ``cfg.data`` it was made from (less the
    images cache-teacher --skip-bad left out), checked against the cache's fingerprint."""
    from kdpipe import cache as cache_mod
    from kdpipe.data import load_dataset

    assert cfg.cache is not None
    cache = cache_mod.open(cfg.cache, require_complete=True)
    cache.advise_random()  # batches gather scattered rows: no readahead (docs/benchmarks.md)
    dataset = load_dataset(cfg.data, exclude=cache.manifest["dataset"].get("skipped", []))
    want = cache.manifest["dataset"]["fingerprint"]
    got = dataset.fingerprint()
    if want != got:
        diff = sorted(k for k in set(want) | set(got) if want.get(k) != got.get(k))
        raise KdpipeError(
            f"--data {cfg.data!r} is not the dataset the cache was made from "
            f"(differs in: {', '.join(diff)}); "
            f"the cache was made from {cache.manifest['dataset'].get('spec')!r}"
        )
    record = cache.manifest["dataset"].get("decoder")
    if record is not None and hasattr(dataset, "check_decoder"):
        dataset.check_decoder(
            record, cache.manifest.get("run", {}).get("decoder_versions", {}), f"--data {cfg.data!r}"
        )
    return cache, dataset


class CachedTeacher(TeacherSource):
    """Targets gathered from the cache by the batch source (in the DataLoader workers)."""

    @classmethod
    def from_cache(cls, cache: Any, where: str) -> CachedTeacher:
        from kdpipe.data.preprocess import Normalize
        from kdpipe.data.views import ViewPolicy

        m = cache.manifest
        return cls(
            policy=ViewPolicy.from_dict(m["views"]["policy"]),
            normalize=Normalize.from_dict(m["teacher"]["spec"]["normalize"]),
            view_seed=int(m["views"]["seed"]),
            num_views=cache.num_views,
            chans=[int(t["shape"][0]) for t in m["taps"]],
            hw=[(int(t["shape"][1]), int(t["shape"][2])) for t in m["taps"]],
            num_classes=int(m["teacher"]["num_classes"]),
            dct_variants=list(m["targets"]["dct"]["variants"]),
            cache=cache,
            where=where,
            grad_form=parse_form((m["targets"].get("grad") or {}).get("form") or "full"),
            taps=[dict(t) for t in m["taps"]],
        )

    def plan(self, required: set[str], variant: str) -> TargetPlan:
        available = set(self.cache.manifest["arrays"])
        return plan_targets(required, len(self.chans), variant, available, self.num_classes, self.selected)

    def derives_dct(self) -> bool:
        return any(a.startswith("at.") for a in self.cache.manifest["arrays"])

    def verify(self, names: list[str], enabled: bool, world: WorldInfo, log: Any) -> None:
        verify_for_training(self.cache, names, enabled, world, log)
        bad = self.cache.nonfinite()
        if bad and world.is_main:
            from kdpipe.cache.format import nonfinite_text

            log(f"WARNING: {self.where} was completed with --allow-nonfinite: {nonfinite_text(bad)}; a "
                "batch that draws such a sample stops the run with a non-finite loss")  # fmt: skip

    def check_targets(self, names: list[str], method: str, required: set[str]) -> None:
        available = set(self.cache.manifest["arrays"])
        missing = [n for n in names if n not in available]
        if not self.chans:  # a cache without taps (e.g. --targets logits) has no per-tap arrays to list
            missing += [f"{k}.0" for k in sorted(required - {"logits"})]
        if missing:
            raise KdpipeError(
                f"method {method!r} needs cached targets {', '.join(missing)} that "
                f"{self.where} does not hold; "
                "re-run cache-teacher with --targets including them"
            )


class OnlineTeacher(TeacherSource):
    """The ONNX teacher run by onnxruntime on every batch's replayed views."""

    runner: Any = None
    spec: Any = None
    gradients: Any = None  # TeacherGradients: J_T through the replica, built on the first grad-at batch
    graph: Any = None
    tap_infos: Any = None  # the graph's TapInfo list (the replica checks every tap against onnxruntime)

    @property
    def needs_uint8(self) -> bool:
        return True

    @classmethod
    def from_onnx(cls, cfg: DistillConfig, dataset: Any) -> OnlineTeacher:
        from kdpipe.cache_teacher import CacheJob, view_policy_for
        from kdpipe.teacher import TeacherRunner, load_teacher, resolve_taps, spec_for

        assert cfg.online_teacher is not None
        graph = load_teacher(cfg.online_teacher)
        taps = resolve_taps(graph, cfg.teacher_taps)
        spec = spec_for(graph, card=cfg.teacher_card)
        job = CacheJob(teacher="", data="", out="", views=cfg.views, augment=cfg.augment,
                       pad=cfg.view_pad, flip=cfg.view_flip)  # fmt: skip
        variants = [cfg.dct_variant or "dft-abs"]
        source = cls(
            policy=view_policy_for(job, spec.size, int(dataset.sizes().max())),
            normalize=spec.normalize,
            view_seed=cfg.view_seed,
            num_views=max(cfg.views, 1),
            chans=[t.shape[0] for t in taps],
            hw=[(t.shape[1], t.shape[2]) for t in taps],
            num_classes=graph.num_classes,
            dct_variants=variants,
            grad_form=parse_form(cfg.grad_form, (spec.size[0], spec.size[1])),
            taps=[
                {"name": t.name, "layout": t.layout, "block": t.block, "module_path": t.module_path}
                for t in taps
            ],  # fmt: skip
        )
        source.spec, source.graph, source.tap_infos = spec, graph, taps
        source.runner = TeacherRunner(graph, taps, spec, targets={"logits", "at", "dct", "pooled"},
                                      provider="auto", threads=cfg.threads, reduce="graph",
                                      dct_variants=tuple(variants), spinning=False)  # fmt: skip
        return source

    def targets(self, batch: dict[str, Any], names: list[str]) -> dict[str, torch.Tensor]:
        x = self.spec.preprocess(batch["uint8"])
        raw = self.runner.run(x)
        if "grad" in names:  # J_T live, through the replica (as cache-teacher --targets grad)
            if self.gradients is None:
                from kdpipe.teacher.gradients import TeacherGradients

                self.gradients = TeacherGradients(self.graph, self.tap_infos, self.spec, self.grad_form)
            raw["grad"] = self.gradients(x, np.asarray(batch["y"], dtype=np.int64))
        return {k: torch.from_numpy(raw[k]) for k in names}


def verify_for_training(cache: Any, names: list[str], enabled: bool, world: WorldInfo, log: Any) -> None:
    """Check the crc32 of every chunk of the arrays ``names`` before any of them reaches a loss.

    A full check at start (measured against per-chunk checks in docs/benchmarks.md): a damaged
    cache stops the run before its first step, so no checkpoint of it is ever kept. DDP ranks split
    the files and agree on the outcome. KdpipeError names the file and the chunk.
    """
    from kdpipe.cache.verify import verify

    if not enabled:
        if world.is_main:
            log(f"cache {cache.path} NOT verified (--no-verify): damaged bytes would go unnoticed")
        return
    t0 = time.perf_counter()
    problems = verify(cache.path, names, part=(world.rank, world.world_size))
    bad = bool(problems)
    if world.distributed:  # any rank's damage stops every rank; NCCL reduces only CUDA tensors
        nccl = torch.distributed.get_backend() == "nccl"
        flag = torch.tensor(
            [int(bad)], dtype=torch.int64, device=f"cuda:{world.local_rank}" if nccl else "cpu"
        )
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        bad = bool(flag.item())
    if bad:
        first = problems[0] if problems else "damage found by another rank (see its message)"
        more = f" (and {len(problems) - 1} more problem(s))" if len(problems) > 1 else ""
        raise KdpipeError(
            f"cache {cache.path} is damaged: {first}{more}; nothing was trained. `kdpipe cache verify "
            f"{cache.path}` lists every problem"
        )
    if world.is_main:
        nbytes = sum(cache.layout.data_bytes(n, i) for n in names for i in range(cache.layout.num_shards))
        took = time.perf_counter() - t0
        log(f"cache verified: {len(names)} array(s), {nbytes / 2**20:,.1f} MiB in {took:.1f} s")


def check_one_source(cfg: DistillConfig) -> None:
    if (cfg.cache is None) == (cfg.online_teacher is None):
        raise KdpipeError("give exactly one of --cache (the normal case) or --online-teacher (the baseline)")


def open_teacher(cfg: DistillConfig) -> tuple[TeacherSource, Any]:
    """The teacher source of ``cfg`` (exactly one of ``--cache`` and ``--online-teacher``) and the
    training dataset."""
    from kdpipe.data import load_dataset

    check_one_source(cfg)
    if cfg.cache is not None:
        cache, dataset = open_cache(cfg)
        source: TeacherSource = CachedTeacher.from_cache(cache, cfg.cache)
    else:
        dataset = load_dataset(cfg.data)
        source = OnlineTeacher.from_onnx(cfg, dataset)
    if source.num_classes and dataset.num_classes > source.num_classes:
        raise KdpipeError(
            f"the dataset has {dataset.num_classes} classes but the teacher {source.num_classes}"
        )
    return source, dataset
