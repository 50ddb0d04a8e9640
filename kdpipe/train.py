"""`kdpipe distill`: train a student from the cache (or, for comparison, from an online teacher).

One loop, read top to bottom: set up (data, cache, student, method, optimiser), then per epoch:
batches -> forward with tap hooks -> loss -> step; evaluate; checkpoint; at the end export to ONNX.
"""

from __future__ import annotations

import errno
import json
import math
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from kdpipe import __version__
from kdpipe.batches import BatchSource, EpochKeys, epoch_order, epoch_views, loader, rank_batches
from kdpipe.distributed import WorldInfo, discover_world
from kdpipe.errors import KdpipeError
from kdpipe.progress import Progress
from kdpipe.targets import TargetPlan, plan_targets


@dataclass
class DistillConfig:
    """The resolved configuration of a run (written to RUN/config.json)."""

    data: str
    out: str
    student: str = "resnet20"
    student_kwargs: dict[str, Any] = field(default_factory=dict)
    method: str = "kd"
    weights: dict[str, float] = field(default_factory=dict)
    cache: str | None = None
    online_teacher: str | None = None
    val_data: str | None = None
    student_taps: str | list[str] = "auto"
    teacher_taps: str | list[str] = "auto"  # online teacher only
    teacher_card: str | None = None  # online teacher only: YAML card with its preprocessing
    views: int = 0  # online teacher only (a cache brings its own)
    augment: str = "auto"  # online teacher only
    view_pad: int = 4  # online teacher only
    view_flip: bool = True  # online teacher only
    view_seed: int = 0  # online teacher only
    dct_variant: str | None = None
    teacher_correct_mask: bool = False
    temperature: float = 4.0
    epochs: int = 10
    batch_size: int = 128
    lr: float = 0.1
    optimizer: str = "sgd"
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    schedule: str = "cosine"
    milestones: list[int] = field(default_factory=list)
    gamma: float = 0.2
    warmup_epochs: float = 0.0
    label_smoothing: float = 0.0
    amp: str = "none"
    channels_last: bool = False
    clip_grad: float = 0.0
    seed: int = 0
    eval_every: int = 1
    workers: int = 2
    device: str = "auto"
    threads: int | None = None
    resume: bool = False
    export_onnx: bool = True
    progress: bool = True
    max_steps: int = 0  # stop after this many steps in total (benchmarks/tests); 0 = no limit
    verify: bool = True  # check every chunk's crc32 of the arrays used before training (--no-verify)


# ----------------------------------------------------------------------------- set-up helpers
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
    bad = len(problems)
    if world.distributed:
        flag = torch.tensor([bad], dtype=torch.int64)
        torch.distributed.all_reduce(flag)
        bad = int(flag.item())
    if bad:
        first = problems[0] if problems else "damage found by another rank (see its message)"
        more = f" (and {bad - 1} more problem(s))" if bad > 1 else ""
        raise KdpipeError(
            f"cache {cache.path} is damaged: {first}{more}; nothing was trained. `kdpipe cache verify "
            f"{cache.path}` lists every problem"
        )
    if world.is_main:
        nbytes = sum(cache.layout.data_bytes(n, i) for n in names for i in range(cache.layout.num_shards))
        took = time.perf_counter() - t0
        log(f"cache verified: {len(names)} array(s), {nbytes / 2**20:,.1f} MiB in {took:.1f} s")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def lr_at(cfg: DistillConfig, epoch_float: float) -> float:
    """Learning rate at a fractional epoch: linear warm-up, then multistep or cosine."""
    if cfg.warmup_epochs > 0 and epoch_float < cfg.warmup_epochs:
        return cfg.lr * (epoch_float + 1e-8) / cfg.warmup_epochs
    if cfg.schedule == "multistep":
        return cfg.lr * cfg.gamma ** sum(epoch_float >= m for m in cfg.milestones)
    if cfg.schedule == "cosine":
        span = max(cfg.epochs - cfg.warmup_epochs, 1e-8)
        t = min(max(epoch_float - cfg.warmup_epochs, 0.0) / span, 1.0)
        return cfg.lr * 0.5 * (1 + math.cos(math.pi * t))
    if cfg.schedule == "constant":
        return cfg.lr
    raise KdpipeError(f"--schedule {cfg.schedule!r}: choose multistep, cosine or constant")


def make_optimizer(cfg: DistillConfig, params: list[nn.Parameter]) -> torch.optim.Optimizer:
    decay = [p for p in params if p.ndim > 1]
    no_decay = [p for p in params if p.ndim <= 1]  # biases and norm weights
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(
            groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0
        )
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr)
    raise KdpipeError(f"--optimizer {cfg.optimizer!r}: choose sgd or adamw")


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise KdpipeError(f"--device {name}: no CUDA device is visible to torch here; use --device cpu")
    return torch.device(name)


class DistillModule(nn.Module):
    """Student + method (its learned parts, e.g. AFD's meta-network) as one module, so that DDP sees
    every trained parameter and the loss is computed inside forward."""

    def __init__(self, student: nn.Module, taps: Any, method: Any) -> None:
        super().__init__()
        self.student = student
        self.taps = taps
        self.method = method  # an nn.Module: its learned parts (AFD) train and checkpoint with the student

    def forward(self, x: torch.Tensor, y: torch.Tensor, teacher: dict[str, torch.Tensor]) -> Any:
        logits = self.student(x)
        loss, terms = self.method(logits, y, self.taps.features, teacher)
        return loss, terms, logits


def target_names_for(kinds: set[str], num_taps: int, dct_variant: str) -> list[str]:
    """Cache array names a method reads, e.g. {"at", "logits"} -> ["logits", "at.0", "at.1", ...]."""
    names = ["logits"] if "logits" in kinds else []
    for i in range(num_taps):
        names += [f"at.{i}"] if "at" in kinds else []
        names += [f"dct.{dct_variant}.{i}"] if "dct" in kinds else []
        names += [f"pooled.{i}"] if "pooled" in kinds else []
    return names


# ----------------------------------------------------------------------------- evaluation / export


@torch.no_grad()
def evaluate(
    model: nn.Module, source: BatchSource, batch_size: int, device: torch.device, channels_last: bool = False
) -> dict[str, float]:
    """Top-1, top-5 (%) and mean CE loss on the plain views of ``source.dataset``."""
    model.eval()
    n = len(source.dataset)
    correct1 = correct5 = 0
    loss_sum = 0.0
    for start in range(0, n, batch_size):
        samples = np.arange(start, min(start + batch_size, n), dtype=np.int64)
        batch = source[(samples, np.full_like(samples, -1))]
        x = batch["x"].to(device)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        y = batch["y"].to(device)
        logits = model(x).float()
        loss_sum += float(F.cross_entropy(logits, y, reduction="sum"))
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        correct1 += int((top[:, 0] == y).sum())
        correct5 += int((top == y[:, None]).any(dim=1).sum())
    model.train()
    return {"top1": 100.0 * correct1 / n, "top5": 100.0 * correct5 / n, "loss": loss_sum / n}


def export_student(
    model: nn.Module, in_chans: int, size: int, path: Path, preprocess: dict[str, Any]
) -> float:
    """Export to ONNX (dynamic batch, one self-contained file carrying its preprocessing as metadata
    ``kdpipe.preprocess``) and return max |onnxruntime - torch| on a random batch."""
    import contextlib
    import io
    import logging
    import warnings

    import onnx
    import onnxruntime as ort

    model = model.eval().cpu().float()
    x = torch.randn(2, in_chans, size, size)
    quiet = io.StringIO()
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    with warnings.catch_warnings(), contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet):
        warnings.simplefilter("ignore")
        try:
            prog = torch.onnx.export(
                model,
                (x,),
                input_names=["input"],
                output_names=["logits"],
                dynamic_shapes=({0: torch.export.Dim("batch", min=1)},),
                dynamo=True,
                verbose=False,
            )
            proto = prog.model_proto  # type: ignore[union-attr]
        except Exception:  # the dynamo exporter cannot take every user model: the legacy one can
            buf = io.BytesIO()
            torch.onnx.export(
                model,
                (x,),
                buf,  # type: ignore[arg-type]
                input_names=["input"],
                output_names=["logits"],
                dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
                dynamo=False,
            )
            proto = onnx.load_from_string(buf.getvalue())
    onnx.helper.set_model_props(proto, {"kdpipe.preprocess": json.dumps(preprocess)})
    onnx.save_model(proto, str(path), save_as_external_data=False)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    xb = torch.randn(3, in_chans, size, size)
    got = sess.run(None, {sess.get_inputs()[0].name: xb.numpy()})[0]
    with torch.no_grad():
        want = model(xb).numpy()
    return float(np.abs(got - want).max())


# ----------------------------------------------------------------------------- checkpoints


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write atomically (temp file, fsync, rename, fsync of the folder): a killed run never leaves a
    half-written checkpoint behind. A full disk is one clear line; the previous checkpoint stays."""
    tmp = path.with_suffix(".tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except (OSError, RuntimeError) as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError) and e.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            raise
        free = shutil.disk_usage(path.parent).free
        if isinstance(e, RuntimeError) and free > 64 << 20:
            raise  # torch's own failure, not a full disk
        raise KdpipeError(
            f"cannot write checkpoint {path}: disk full ({free / 2**20:.1f} MiB free); the previous "
            "checkpoint is kept: free some space and run the same command with --resume"
        ) from None


# ----------------------------------------------------------------------------- the run


def _check_dataset(cache: Any, dataset: Any, data: str) -> None:
    want = cache.manifest["dataset"]["fingerprint"]
    got = dataset.fingerprint()
    if want != got:
        diff = sorted(k for k in set(want) | set(got) if want.get(k) != got.get(k))
        raise KdpipeError(
            f"--data {data!r} is not the dataset the cache was made from (differs in: {', '.join(diff)}); "
            f"the cache was made from {cache.manifest['dataset'].get('spec')!r}"
        )


# Settings a resumed run may change: they do not alter what is trained (or only extend it).
_RESUME_FREE = {
    "resume",
    "verify",
    "progress",
    "workers",
    "threads",
    "device",
    "epochs",
    "max_steps",
    "export_onnx",
    "eval_every",
    "val_data",
    "out",
    "cache",
    "online_teacher",
    "data",
}


def _check_resumable(saved: dict[str, Any], now: dict[str, Any], out: Path) -> None:
    diff = sorted(k for k in saved if k not in _RESUME_FREE and k in now and saved[k] != now[k])
    if diff:
        what = ", ".join(f"{k} {saved[k]!r} -> {now[k]!r}" for k in diff)
        raise KdpipeError(
            f"--resume: {out} was started with other settings ({what}); resume with the original "
            "settings, or choose another --out"
        )


def _truncate_logs(out: Path, epoch: int) -> None:
    """Drop log records past the checkpoint (a run killed between logging and checkpointing an epoch
    would otherwise log that epoch twice)."""
    for name, key, keep in (
        ("metrics.jsonl", "epoch", lambda e: e <= epoch),
        ("steps.jsonl", "epoch", lambda e: e < epoch),
    ):
        path = out / name
        if path.exists():
            lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
            kept = [ln for ln in lines if _complete_record(ln) and keep(json.loads(ln)[key])]
            path.write_text("".join(ln + "\n" for ln in kept))


def _complete_record(line: str) -> bool:
    """False for a line torn by a crash or a full disk mid-write."""
    try:
        json.loads(line)
        return True
    except ValueError:
        return False


def _teacher_shapes(cache: Any) -> tuple[list[int], list[tuple[int, int]], int]:
    taps = cache.manifest["taps"]
    chans = [int(t["shape"][0]) for t in taps]
    hw = [(int(t["shape"][1]), int(t["shape"][2])) for t in taps]
    return chans, hw, int(cache.manifest["teacher"]["num_classes"])


def distill(cfg: DistillConfig, log: Any = print) -> dict[str, Any]:
    """Run (or resume) a distillation run; returns the summary written to RUN/summary.json."""
    from kdpipe import cache as cache_mod
    from kdpipe.data import load_dataset
    from kdpipe.data.preprocess import Normalize
    from kdpipe.losses import parse_method
    from kdpipe.memory import keep_freed_memory
    from kdpipe.student import StudentTaps, create_model

    keep_freed_memory()
    world = discover_world()
    if world.distributed and not torch.distributed.is_initialized():
        backend = "nccl" if torch.cuda.is_available() and cfg.device != "cpu" else "gloo"
        torch.distributed.init_process_group(backend)
    device = pick_device(
        cfg.device
        if not (world.distributed and cfg.device == "auto" and torch.cuda.is_available())
        else f"cuda:{world.local_rank}"
    )
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if (cfg.cache is None) == (cfg.online_teacher is None):
        raise KdpipeError("give exactly one of --cache (the normal case) or --online-teacher (the baseline)")
    if cfg.epochs < 1 or cfg.batch_size < 1:
        raise KdpipeError("--epochs and --batch-size must be >= 1")
    out = Path(cfg.out)
    ckpt_dir = out / "checkpoints"
    if world.is_main:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
    if (ckpt_dir / "last.pt").exists() and not cfg.resume:
        raise KdpipeError(f"{out} already holds a run: pass --resume to continue it, or choose another --out")

    # --- teacher side: a cache (normal) or an online onnxruntime teacher (the baseline)
    online = None
    online_spec: Any = None
    if cfg.cache is not None:
        cache = cache_mod.open(cfg.cache, require_complete=True)
        cache.advise_random()  # batches gather scattered rows: no readahead (docs/benchmarks.md)
        # the images cache-teacher --skip-bad left out are left out here too
        dataset = load_dataset(cfg.data, exclude=cache.manifest["dataset"].get("skipped", []))
        _check_dataset(cache, dataset, cfg.data)
        from kdpipe.data.views import ViewPolicy

        policy = ViewPolicy.from_dict(cache.manifest["views"]["policy"])
        spec_dict = cache.manifest["teacher"]["spec"]
        teacher_norm = Normalize.from_dict(spec_dict["normalize"])
        view_seed = int(cache.manifest["views"]["seed"])
        num_views = cache.num_views
        t_chans, t_hw, t_classes = _teacher_shapes(cache)
        dct_variants = cache.manifest["targets"]["dct"]["variants"]
        available = set(cache.manifest["arrays"])
    else:
        from kdpipe.cache_teacher import CacheJob, view_policy_for
        from kdpipe.teacher import TeacherRunner, load_teacher, resolve_taps, spec_for

        assert cfg.online_teacher is not None
        dataset = load_dataset(cfg.data)
        graph = load_teacher(cfg.online_teacher)
        taps = resolve_taps(graph, cfg.teacher_taps)
        spec = online_spec = spec_for(graph, card=cfg.teacher_card)
        policy = view_policy_for(
            CacheJob(
                teacher="",
                data="",
                out="",
                views=cfg.views,
                augment=cfg.augment,
                pad=cfg.view_pad,
                flip=cfg.view_flip,
            ),
            spec.size,
            int(dataset.sizes().max()),
        )
        teacher_norm = spec.normalize
        view_seed = cfg.view_seed
        num_views = max(cfg.views, 1)
        t_chans = [t.shape[0] for t in taps]
        t_hw = [(t.shape[1], t.shape[2]) for t in taps]
        t_classes = graph.num_classes
        dct_variants = [cfg.dct_variant or "dft-abs"]
        online = TeacherRunner(
            graph,
            taps,
            spec,
            targets={"logits", "at", "dct", "pooled"},
            provider="auto",
            threads=cfg.threads,
            reduce="graph",
            dct_variants=tuple(dct_variants),
            spinning=False,
        )
        cache = None
    if cfg.batch_size * world.world_size > len(dataset):
        raise KdpipeError(
            f"--batch-size {cfg.batch_size} x {world.world_size} process(es) exceeds the {len(dataset)} "
            f"samples of --data {cfg.data!r}: lower --batch-size"
        )
    if t_classes and dataset.num_classes > t_classes:
        raise KdpipeError(f"the dataset has {dataset.num_classes} classes but the teacher {t_classes}")
    num_classes = t_classes or dataset.num_classes

    variant = cfg.dct_variant or (dct_variants[0] if dct_variants else "dft-abs")
    derivable = cache is not None and any(a.startswith("at.") for a in available)
    if variant not in dct_variants and not derivable:  # a cache's at maps give any variant
        raise KdpipeError(f"--dct-variant {variant!r}: the teacher targets hold {', '.join(dct_variants)}")
    method = parse_method(
        cfg.method,
        cfg.weights or None,
        T=cfg.temperature,
        label_smoothing=cfg.label_smoothing,
        dct_variant=variant,
        dct_mask=cfg.teacher_correct_mask,
    )
    if cache is not None:
        plan = plan_targets(method.required_targets, len(t_chans), variant, available, t_classes)
    else:
        plan = TargetPlan(target_names_for(method.required_targets, len(t_chans), variant))
    target_names = plan.read
    if cache is not None:
        missing = [n for n in target_names if n not in available]
        if not t_chans:  # a cache without taps (e.g. --targets logits) has no per-tap arrays to list
            missing += [f"{k}.0" for k in sorted(method.required_targets - {"logits"})]
        if missing:
            raise KdpipeError(
                f"method {cfg.method!r} needs cached targets {', '.join(missing)} that "
                f"{cfg.cache} does not hold; re-run cache-teacher with --targets including them"
            )

    # --- student
    in_chans = teacher_norm.channels
    student_norm = Normalize(
        scale=teacher_norm.scale,
        mean=teacher_norm.mean,
        std=teacher_norm.std,
        channels=in_chans,
        channel_order="rgb",
        layout="NCHW",
    )
    seed_everything(cfg.seed)
    student = create_model(cfg.student, num_classes=num_classes, in_chans=in_chans, **cfg.student_kwargs)
    taps_s = StudentTaps(student, cfg.student_taps)
    with torch.no_grad():
        student.eval()
        student(torch.zeros(2, in_chans, policy.size, policy.size))
        student.train()
    s_chans = [int(f.shape[1]) for f in taps_s.features]
    s_hw = [tuple(f.shape[2:]) for f in taps_s.features]
    if method.needs_build:
        method.build(s_chans, t_chans)
    one_to_one = bool({"at", "dct"} & set(method.terms))
    if one_to_one and len(s_chans) != len(t_chans):
        raise KdpipeError(
            f"method {cfg.method!r} pairs student and teacher taps one to one, but the student has "
            f"{len(s_chans)} ({', '.join(taps_s.names)}) and the teacher {len(t_chans)}: choose "
            "--student-taps (or --taps at cache time) to match, or use afd"
        )
    pairing = (
        [(i, i) for i in range(len(t_chans))]
        if one_to_one
        else [(s, t) for t in range(len(t_chans)) for s in range(len(s_chans))]
        if method.needs_build
        else []
    )
    module = DistillModule(student, taps_s, method).to(device)
    if cfg.channels_last:
        module = module.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    params = [p for p in module.parameters() if p.requires_grad]
    optimizer = make_optimizer(cfg, params)
    use_scaler = cfg.amp == "fp16"
    scaler = torch.amp.GradScaler(device.type, enabled=use_scaler)
    amp_choices: dict[str, torch.dtype | None] = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}
    if cfg.amp not in amp_choices:
        raise KdpipeError(f"--amp {cfg.amp!r}: choose none, bf16 or fp16")
    amp_dtype = amp_choices[cfg.amp]
    train_model: nn.Module = module
    if world.distributed:
        train_model = nn.parallel.DistributedDataParallel(
            module, device_ids=[device.index] if device.type == "cuda" else None
        )

    # --- state, resume
    start_epoch, best, history_steps = 0, -1.0, 0
    if cfg.resume and (ckpt_dir / "last.pt").exists():
        state = torch.load(ckpt_dir / "last.pt", map_location=device, weights_only=False)
        _check_resumable(state.get("config", {}), asdict(cfg), out)
        module.load_state_dict(state["module"])
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["torch_rng"])
        start_epoch, best, history_steps = state["epoch"], state["best"], state["steps"]
        if world.is_main:
            _truncate_logs(out, start_epoch)
        log(f"resuming {out} at epoch {start_epoch + 1}")
    elif world.is_main:
        if cfg.resume:
            log(f"--resume: {out} holds no checkpoint yet; starting a new run")
        (out / "metrics.jsonl").write_text("")
        (out / "steps.jsonl").unlink(missing_ok=True)

    if world.is_main:
        resolved = asdict(cfg) | {
            "num_classes": num_classes,
            "in_chans": in_chans,
            "image_size": policy.size,
            "num_views": num_views,
            "world_size": world.world_size,
            "effective_batch": cfg.batch_size * world.world_size,
            "kdpipe": __version__,
            "pairing": pairing,
        }
        (out / "config.json").write_text(json.dumps(resolved, indent=2, default=str))
        log(
            f"student {cfg.student} taps: "
            + ", ".join(f"{n} {c}x{h}x{w}" for n, c, (h, w) in zip(taps_s.names, s_chans, s_hw, strict=True))
        )
        if method.needs_build and not one_to_one:
            log(
                f"  AFD: each of {len(t_chans)} teacher tap(s) attends over all {len(s_chans)} student tap(s)"
            )
        else:
            for s_i, t_i in pairing:
                log(f"  pair student {taps_s.names[s_i]} {s_hw[s_i]} <- teacher tap {t_i} {t_hw[t_i]}")
        if num_views and cfg.epochs > 4 * num_views and cache is not None:
            log(
                f"WARNING: {cfg.epochs} epochs over {num_views} cached view(s): each view is reused "
                f"{cfg.epochs / num_views:.0f}x (the 'fixed teacher' regime, known to overfit); "
                "cache more views with --views"
            )

    if cache is not None:  # after every other check: a user mistake never waits for this read
        verify_for_training(cache, [*target_names, "labels", "view_params"], cfg.verify, world, log)
    source = BatchSource(
        dataset,
        policy,
        student_norm,
        cache=cache,
        target_names=tuple(target_names),
        view_seed=view_seed,
        keep_uint8=online is not None,
    )
    val_source = None
    if cfg.val_data:
        from kdpipe.data.views import ViewPolicy

        val_ds = load_dataset(cfg.val_data)
        val_source = BatchSource(val_ds, ViewPolicy(kind="none", size=policy.size, flip=False), student_norm)

    # --- epochs
    metrics_f = out / "metrics.jsonl"
    epoch_times: list[float] = []
    last_eval: dict[str, float] = {}
    steps_total = history_steps
    workers = 0 if online is not None else cfg.workers
    sampler = EpochKeys()
    train_loader = loader(source, sampler, workers, device.type == "cuda")
    for epoch in range(start_epoch, cfg.epochs):
        order = epoch_order(cfg.seed, epoch, len(dataset))
        views = epoch_views(cfg.seed, epoch, order, num_views)
        view_of = np.empty(len(dataset), dtype=np.int64)
        view_of[order] = views
        batches = rank_batches(order, cfg.batch_size, world.rank, world.world_size)
        keys = [(b, view_of[b]) for b in batches]
        bar = Progress(
            len(keys) * cfg.batch_size,
            f"epoch {epoch + 1}/{cfg.epochs}",
            enabled=cfg.progress and world.is_main,
        )
        t0 = time.perf_counter()
        sums: dict[str, float] = {}
        nsteps = 0
        sampler.keys = keys
        for step, batch in enumerate(train_loader):
            lr = lr_at(cfg, epoch + step / len(keys))
            for g in optimizer.param_groups:
                g["lr"] = lr
            x = batch["x"].to(device, non_blocking=True)
            if cfg.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            y = batch["y"].to(device, non_blocking=True)
            if online is not None:
                raw = online.run(online_spec.preprocess(batch["uint8"]))
                teacher = {k: torch.from_numpy(raw[k]) for k in target_names}
            else:
                teacher = batch["targets"]
            teacher = plan.complete({k: v.to(device, non_blocking=True) for k, v in teacher.items()})
            with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                loss, terms, _ = train_model(x, y, teacher)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if cfg.clip_grad > 0:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(params, cfg.clip_grad)
            scaler.step(optimizer)
            scaler.update()
            loss_value = float(loss.detach())
            if not math.isfinite(loss_value):
                raise KdpipeError(
                    f"loss became {loss_value} at epoch {epoch + 1} step {step}: lower --lr "
                    "or the method weights"
                )
            nsteps += 1
            steps_total += 1
            for k, v in {"loss": loss_value, **terms}.items():
                sums[k] = sums.get(k, 0.0) + float(v)
            bar.update(len(y), loss=loss_value)
            if world.is_main and os.environ.get("KDPIPE_LOG_STEPS"):
                with open(out / "steps.jsonl", "a") as f:
                    f.write(
                        json.dumps(
                            {
                                "epoch": epoch,
                                "step": step,
                                "loss": loss_value,
                                "seconds": round(time.perf_counter() - t0, 6),  # since the epoch began
                                **{k: float(v) for k, v in terms.items()},
                            }
                        )
                        + "\n"
                    )
            if cfg.max_steps and steps_total >= cfg.max_steps:
                break
        bar.close()
        dt = time.perf_counter() - t0
        epoch_times.append(dt)
        record: dict[str, Any] = {
            "epoch": epoch + 1,
            "lr": lr_at(cfg, float(epoch)),
            "seconds": round(dt, 3),
            "images_per_s": round(nsteps * cfg.batch_size * world.world_size / dt, 1),
            **{f"train_{k}": v / max(nsteps, 1) for k, v in sums.items()},
        }
        if (
            val_source is not None
            and world.is_main
            and ((epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs)
        ):
            last_eval = evaluate(student, val_source, 256, device, cfg.channels_last)
            record |= {f"val_{k}": v for k, v in last_eval.items()}
        if world.is_main:
            with open(metrics_f, "a") as f:
                f.write(json.dumps(record) + "\n")
            improved = bool(last_eval) and last_eval["top1"] > best
            best = max(best, last_eval.get("top1", -1.0))
            state = {
                "module": module.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scaler": scaler.state_dict(),
                "torch_rng": torch.get_rng_state(),
                "epoch": epoch + 1,
                "best": best,
                "steps": steps_total,
                "config": asdict(cfg),
            }
            save_checkpoint(ckpt_dir / "last.pt", state)
            if improved:
                save_checkpoint(ckpt_dir / "best.pt", state)
            msg = f"epoch {epoch + 1}: loss {record.get('train_loss', float('nan')):.4f}"
            if last_eval:
                msg += f"  val top1 {last_eval['top1']:.2f}%"
            log(msg)
        if world.distributed:
            torch.distributed.barrier()
        if cfg.max_steps and steps_total >= cfg.max_steps:
            break

    summary: dict[str, Any] = {}
    taps_s.remove()  # hooks off before the ONNX export traces the student
    if world.is_main:
        preprocess = {"input_size": [policy.size, policy.size], "normalize": student_norm.to_dict()}
        summary = _finish(cfg, out, student, in_chans, policy.size, preprocess, metrics_f, epoch_times, world)
        log(
            json.dumps(
                {k: summary[k] for k in ("best_top1", "last_top1", "onnx_max_abs_diff") if k in summary}
            )
        )
    if world.distributed:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return summary


def _finish(
    cfg: DistillConfig,
    out: Path,
    student: nn.Module,
    in_chans: int,
    size: int,
    preprocess: dict[str, Any],
    metrics_f: Path,
    epoch_times: list[float],
    world: WorldInfo,
) -> dict[str, Any]:
    records = [json.loads(line) for line in metrics_f.read_text().splitlines() if line.strip()]
    tops = [r["val_top1"] for r in records if "val_top1" in r]
    summary: dict[str, Any] = {
        "best_top1": max(tops) if tops else None,
        "last_top1": tops[-1] if tops else None,
        "last_top5": next((r["val_top5"] for r in reversed(records) if "val_top5" in r), None),
        "epochs": len(records),
        "seed": cfg.seed,
        "world_size": world.world_size,
        "effective_batch": cfg.batch_size * world.world_size,
        "seconds_per_epoch": float(np.mean(epoch_times)) if epoch_times else None,
        "method": cfg.method,
        "student": cfg.student,
    }
    if cfg.export_onnx:
        path = out / "student.onnx"
        summary["onnx"] = str(path)
        summary["onnx_max_abs_diff"] = export_student(student, in_chans, size, path, preprocess)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary
