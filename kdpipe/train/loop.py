"""`kdpipe distill`: train a student from the cache (or, for comparison, from an online teacher).

Read top to bottom: :func:`distill` sets up the run (:func:`setup`: each piece from its own module),
then runs :func:`train_epoch` until done; an epoch is :func:`train_step` per batch, then
:func:`end_epoch` (evaluate, log, checkpoint); :func:`finish` exports the student and writes the
summary. The state that moves, :class:`Position`, is what a checkpoint restores, at any step.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from kdpipe import __version__
from kdpipe.batches import BatchSource, EpochKeys, loader
from kdpipe.distributed import WorldInfo
from kdpipe.errors import KdpipeError
from kdpipe.progress import Progress
from kdpipe.targets import TargetPlan
from kdpipe.train.checkpoint import Checkpoints
from kdpipe.train.config import DistillConfig, check_resumable, per_rank_batch
from kdpipe.train.ddp import barrier, mean_over_ranks, pick_device, start_world, stop_world
from kdpipe.train.evaluation import evaluate
from kdpipe.train.export import export_student
from kdpipe.train.logs import RunLog, log_interval
from kdpipe.train.model import (
    Student,
    build_module,
    build_student,
    describe_taps,
    pair_taps,
    parse_run_method,
)
from kdpipe.train.optim import Precision, lr_at, make_optimizer, set_lr
from kdpipe.train.order import ChunkedOrder, ReadAhead, class_mix, epoch_keys, parse_order, read_ahead_plan
from kdpipe.train.summary import read_records, summarise, table
from kdpipe.train.teacher import TeacherSource, check_one_source, open_teacher

Log = Callable[[str], Any]


@dataclass
class Position:
    """Where the run is: what a checkpoint saves besides the weights and the optimiser."""

    epoch: int = 0  # finished epochs
    step: int = 0  # steps done in the current epoch
    steps: int = 0  # steps done in total
    best: float = -1.0  # best val top-1 so far (%)
    sums: dict[str, float] = field(default_factory=dict)  # the current epoch's sums of "loss" and terms

    def advance(self, values: dict[str, float]) -> None:
        self.step += 1
        self.steps += 1
        for k, v in values.items():
            self.sums[k] = self.sums.get(k, 0.0) + v


@dataclass
class Run:
    """Everything the loop uses, built once by :func:`setup`."""

    cfg: DistillConfig
    world: WorldInfo
    device: torch.device
    out: Path
    batch: int  # per process
    teacher: TeacherSource
    student: Student
    module: nn.Module  # student + method (what is checkpointed)
    model: nn.Module  # module, or module under DistributedDataParallel (what is stepped)
    params: list[nn.Parameter]
    optimizer: torch.optim.Optimizer
    precision: Precision
    plan: TargetPlan  # teacher arrays the method reads (plan.read) and derives (plan.complete)
    source: BatchSource
    val_source: BatchSource | None
    sampler: EpochKeys
    loader: Any
    ckpts: Checkpoints
    logs: RunLog
    preprocess: dict[str, Any]  # the student's input, recorded in its ONNX file
    pos: Position = field(default_factory=Position)
    pending_rng: torch.Tensor | None = None  # a mid-epoch resume restores it after the epoch's iterator
    world_sizes: list[int] = field(default_factory=list)
    order: ChunkedOrder | None = None  # --order chunked: the windows, and their read-ahead
    read_ahead: ReadAhead | None = None
    epoch_times: list[float] = field(default_factory=list)
    last_eval: dict[str, float] = field(default_factory=dict)

    @property
    def global_batch(self) -> int:
        return self.batch * self.world.world_size

    def out_of_steps(self) -> bool:
        return bool(self.cfg.max_steps) and self.pos.steps >= self.cfg.max_steps


def distill(cfg: DistillConfig, log: Log = print) -> dict[str, Any]:
    """Run (or resume) a distillation run; returns the summary written to RUN/summary.json."""
    from kdpipe.memory import keep_freed_memory

    keep_freed_memory()
    run = setup(cfg, start_world(cfg.device), log)
    while run.pos.epoch < cfg.epochs and not run.out_of_steps():
        train_epoch(run, log)
    return finish(run, log)


def train_step(run: Run, batch: dict[str, Any], lr: float, progress: float = 0.0) -> dict[str, float]:
    """One optimiser step on one batch at ``progress`` epochs; returns "loss" (the weighted total), each
    unweighted term and "top1" (% of the batch the student got right), averaged over the processes."""
    cfg, device, optimizer, scaler = run.cfg, run.device, run.optimizer, run.precision.scaler
    set_lr(optimizer, lr)
    method: Any = run.module.method
    method.progress = progress  # term warm-ups (--term-warmup)
    x = batch["x"].to(device, non_blocking=True)
    if cfg.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = batch["y"].to(device, non_blocking=True)
    gathered = run.teacher.targets(batch, run.plan.read)
    teacher = run.plan.complete({k: v.to(device, non_blocking=True) for k, v in gathered.items()})
    with run.precision.autocast(device):
        loss, terms, logits = run.model(x, y, teacher)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    if cfg.clip_grad > 0:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(run.params, cfg.clip_grad)
    scaler.step(optimizer)
    scaler.update()
    top1 = float((logits.detach().argmax(dim=1) == y).float().mean()) * 100.0
    values = {"loss": float(loss.detach()), **{k: float(v) for k, v in terms.items()}, "top1": top1}
    return mean_over_ranks(values, device)


def train_epoch(run: Run, log: Log) -> None:
    """The steps of the current epoch from ``run.pos.step`` on (0, or where a checkpoint left off)."""
    cfg, pos, logs = run.cfg, run.pos, run.logs
    epoch = pos.epoch
    keys = epoch_keys(cfg.seed, epoch, len(run.source.dataset), run.teacher.num_views, run.batch, run.world,
                      run.order)  # fmt: skip
    every = log_interval(cfg.log_every, len(keys))
    bar = Progress(len(keys) * run.batch, f"epoch {epoch + 1}/{cfg.epochs}",
                   enabled=cfg.progress and run.world.is_main, initial=pos.step * run.batch)  # fmt: skip
    run.sampler.keys = keys[pos.step :]
    if run.order is not None and run.read_ahead is not None:
        plan = read_ahead_plan(run.sampler.keys, run.order, run.global_batch)
        run.sampler.hints = run.read_ahead.hints(plan)
    batches = iter(run.loader)
    if run.pending_rng is not None:  # after iter(): it draws the loader's seed from the torch RNG
        torch.set_rng_state(run.pending_rng)
        run.pending_rng = None
    t0, done_here = time.perf_counter(), 0
    while pos.step < len(keys) and not run.out_of_steps():
        t = time.perf_counter()
        batch = next(batches)
        logs.waited(len(batch["y"]) * run.world.world_size, time.perf_counter() - t)
        progress = epoch + pos.step / len(keys)
        values = train_step(run, batch, lr_at(cfg, progress), progress)
        if not math.isfinite(values["loss"]):
            raise KdpipeError(f"loss became {values['loss']} at epoch {epoch + 1} step {pos.step}: lower "
                              "--lr or the method weights")  # fmt: skip
        logs.every(epoch, pos.step, values, time.perf_counter() - t0)
        pos.advance(values)
        done_here += 1
        bar.update(len(batch["y"]), loss=values["loss"])
        if pos.steps % every == 0:
            logs.step(pos.steps, epoch, pos.step - 1, lr_at(cfg, progress), values, every)
        if cfg.checkpoint_every and pos.steps % cfg.checkpoint_every == 0 and pos.step < len(keys):
            if run.world.is_main:
                run.ckpts.save_step(checkpoint_state(run))
    bar.close()
    end_epoch(run, len(keys), done_here, time.perf_counter() - t0, log)


def end_epoch(run: Run, steps_per_epoch: int, done_here: int, seconds: float, log: Log) -> None:
    """Epoch record (train means, val metrics), checkpoint, one line. Also called when --max-steps
    stops an epoch part-way: then the checkpoint keeps the position inside the epoch."""
    cfg, pos, world = run.cfg, run.pos, run.world
    epoch = pos.epoch
    run.epoch_times.append(seconds)
    record: dict[str, Any] = {
        "epoch": epoch + 1,
        "lr": lr_at(cfg, float(epoch)),
        "seconds": round(seconds, 3),
        "images_per_s": round(done_here * run.global_batch / seconds, 1),
        **{f"train_{k}": v / max(pos.step, 1) for k, v in pos.sums.items()},
    }
    if (
        run.val_source is not None
        and world.is_main
        and ((epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs)
    ):
        run.last_eval = evaluate(run.student.model, run.val_source, 256, run.device, cfg.channels_last)
        record |= {f"val_{k}": v for k, v in run.last_eval.items()}
    if pos.step >= steps_per_epoch:
        pos.epoch, pos.step, pos.sums = epoch + 1, 0, {}
    if world.is_main:
        run.logs.epoch(record, pos.steps)
        improved = bool(run.last_eval) and run.last_eval["top1"] > pos.best
        pos.best = max(pos.best, run.last_eval.get("top1", -1.0))
        run.ckpts.save_epoch(checkpoint_state(run), improved)
        msg = f"epoch {epoch + 1}: loss {record.get('train_loss', float('nan')):.4f}"
        log(msg + (f"  val top1 {run.last_eval['top1']:.2f}%" if run.last_eval else ""))
    barrier(world)


def checkpoint_state(run: Run) -> dict[str, Any]:
    """Everything a resume needs to continue bit-for-bit from this step."""
    return {
        "module": run.module.state_dict(),
        "optimizer": run.optimizer.state_dict(),
        "scaler": run.precision.scaler.state_dict(),
        "torch_rng": torch.get_rng_state(),
        "epoch": run.pos.epoch,  # finished epochs
        "step_in_epoch": run.pos.step,
        "epoch_sums": dict(run.pos.sums),
        "best": run.pos.best,
        "steps": run.pos.steps,
        "config": asdict(run.cfg),
        "global_batch": run.global_batch,
        "world_sizes": run.world_sizes,
        "kdpipe": __version__,
    }


# ----------------------------------------------------------------------------- set-up


def fixed_teacher_warning(epochs: int, teacher: Any, log: Any) -> None:
    """Warn when a cache's views are reused so often that the teacher's outputs are fixed: a plain-input
    cache (``--views 0``) over more than one epoch, or more than 4 epochs per cached view."""
    if teacher.cache is None or not teacher.num_views:
        return
    if teacher.policy.kind == "none" and epochs > 1:
        log(f"WARNING: the cache holds the plain input only (cache-teacher --views 0), so the student "
            f"trains {epochs} epochs without augmentation on fixed teacher outputs (on animals over 30 "
            "epochs this cost the plain student 0.7 points of top-1 and KD 0.25, docs/results.md); "
            "cache augmented views with --views")  # fmt: skip
    elif epochs > 4 * teacher.num_views:
        log(f"WARNING: {epochs} epochs over {teacher.num_views} cached view(s): each view is reused "
            f"{epochs / teacher.num_views:.0f}x (the 'fixed teacher' regime, known to overfit); "
            "cache more views with --views")  # fmt: skip


def setup(cfg: DistillConfig, world: WorldInfo, log: Log) -> Run:
    """Build every piece of the run, restore a checkpoint on --resume, and say what will be trained."""
    device = pick_device(cfg.device, world)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    check_one_source(cfg)
    batch = per_rank_batch(cfg, world.world_size)
    out = Path(cfg.out)
    ckpts = Checkpoints(out / "checkpoints")
    if world.is_main:
        ckpts.folder.mkdir(parents=True, exist_ok=True)
    if ckpts.holds_a_run() and not cfg.resume:
        raise KdpipeError(f"{out} already holds a run: pass --resume to continue it, or choose another --out")
    teacher, dataset = open_teacher(cfg)
    if batch * world.world_size > len(dataset):
        raise KdpipeError(
            f"--batch-size {batch} x {world.world_size} process(es) exceeds the {len(dataset)} "
            f"samples of --data {cfg.data!r}: lower --batch-size"
        )
    method, plan = parse_run_method(cfg, teacher)
    order = parse_order(cfg.order, teacher.cache, [*plan.read, "view_params"])
    norm = student_normalize(teacher.normalize)
    num_classes = teacher.num_classes or dataset.num_classes
    student = build_student(cfg, num_classes, norm.channels, teacher.policy.size, world.distributed)
    pairing = pair_taps(cfg, method, student, teacher)
    if teacher.selected is not None:  # the plan reads the paired teacher taps only
        plan = parse_run_method(cfg, teacher)[1]
    module = build_module(cfg, method, student, teacher, device, world.distributed, norm)
    params = [p for p in module.parameters() if p.requires_grad]
    model: nn.Module = module
    if world.distributed:
        model = nn.parallel.DistributedDataParallel(
            module, device_ids=[device.index] if device.type == "cuda" else None
        )
    source = BatchSource(dataset, teacher.policy, norm, cache=teacher.cache, target_names=tuple(plan.read),
                         view_seed=teacher.view_seed, keep_uint8=teacher.needs_uint8)  # fmt: skip
    sampler = EpochKeys()
    workers = 0 if teacher.needs_uint8 else cfg.workers  # the online teacher runs in this process
    run = Run(cfg=cfg, world=world, device=device, out=out, batch=batch, teacher=teacher, student=student,
              module=module, model=model, params=params, optimizer=make_optimizer(cfg, params),
              precision=Precision.of(cfg.amp, device), plan=plan, source=source,
              val_source=val_source(cfg, teacher.policy.size, norm), sampler=sampler,
              loader=loader(source, sampler, workers, device.type == "cuda"), ckpts=ckpts,
              logs=RunLog(out, world.is_main, cfg.tensorboard),
              preprocess={"input_size": [teacher.policy.size] * 2, "normalize": norm.to_dict()})  # fmt: skip
    resolved = restore(run, log) | {"num_classes": num_classes, "in_chans": norm.channels, "pairing": pairing,
                                    "paired_student_taps": student.taps.names,
                                    "paired_teacher_taps": teacher.selected}  # fmt: skip
    if world.is_main:
        (out / "config.json").write_text(json.dumps(resolved, indent=2, default=str))
        for line in describe_taps(cfg.student, method, student, teacher, pairing):
            log(line)
        fixed_teacher_warning(cfg.epochs, teacher, log)
    if order is not None:
        chunked_order(run, order, dataset, log)
    # after every other check, so that a user mistake never waits for this read
    teacher.verify([*plan.read, "labels", "view_params"], cfg.verify, world, log)
    return run


def chunked_order(run: Run, order: ChunkedOrder, dataset: Any, log: Log) -> None:
    """``--order chunked``: the windows, their read-ahead, and what they do to a batch's class mix."""
    cfg = run.cfg
    run.order, run.read_ahead = order, ReadAhead(run.teacher.cache, [*run.plan.read, "view_params"])
    if run.world.is_main:
        o, n, labels = order, len(dataset), np.asarray(dataset.labels)
        mixed = class_mix(labels, epoch_keys(cfg.seed, 0, n, 1, run.batch, run.world, o))
        plain = class_mix(labels, epoch_keys(cfg.seed, 0, n, 1, run.batch, run.world))
        log(f"order: chunked, windows of {o.window} chunk(s) x {o.chunk} samples; a batch holds "
            f"{mixed:.1f} distinct classes on average ({plain:.1f} with --order random)")  # fmt: skip


def student_normalize(teacher_norm: Any) -> Any:
    """The student sees the teacher's normalisation, as RGB NCHW (whatever the teacher's layout)."""
    from kdpipe.data.preprocess import Normalize

    return Normalize(scale=teacher_norm.scale, mean=teacher_norm.mean, std=teacher_norm.std,
                     channels=teacher_norm.channels, channel_order="rgb", layout="NCHW")  # fmt: skip


def val_source(cfg: DistillConfig, size: int, norm: Any) -> BatchSource | None:
    """Plain (un-augmented) views of --val-data, or None."""
    if not cfg.val_data:
        return None
    from kdpipe.data import load_dataset
    from kdpipe.data.views import ViewPolicy

    return BatchSource(load_dataset(cfg.val_data), ViewPolicy(kind="none", size=size, flip=False), norm)


def restore(run: Run, log: Log) -> dict[str, Any]:
    """--resume: load the newest intact checkpoint into the run; start the logs; return the resolved
    config (what config.json records)."""
    cfg, world = run.cfg, run.world
    state = run.ckpts.newest(run.device, log) if cfg.resume else None
    if state is not None:
        check_resumable(state, asdict(cfg), run.global_batch, run.out)
        run.module.load_state_dict(state["module"])
        run.optimizer.load_state_dict(state["optimizer"])
        run.precision.scaler.load_state_dict(state["scaler"])
        run.pos = Position(state["epoch"], state.get("step_in_epoch", 0), state["steps"], state["best"],
                           dict(state.get("epoch_sums", {})))  # fmt: skip
        if run.pos.step:
            run.pending_rng = state["torch_rng"]
        else:
            torch.set_rng_state(state["torch_rng"])
        run.world_sizes = list(state.get("world_sizes", []))
    elif cfg.resume and world.is_main:
        log(f"--resume: {run.out} holds no checkpoint yet; starting a new run")
    if not run.world_sizes or run.world_sizes[-1] != world.world_size:
        run.world_sizes.append(world.world_size)
    resolved = asdict(cfg) | {"image_size": run.teacher.policy.size, "num_views": run.teacher.num_views,
                              "world_size": world.world_size, "world_sizes": run.world_sizes,
                              "effective_batch": run.global_batch, "kdpipe": __version__}  # fmt: skip
    run.logs.start(state, resolved)
    if state is not None and world.is_main:
        log(
            f"resuming {run.out} at epoch {run.pos.epoch + 1}"
            + (f" step {run.pos.step}" if run.pos.step else "")
        )
    return resolved


def finish(run: Run, log: Log) -> dict[str, Any]:
    """Export the student (rank 0), write RUN/summary.json and print the summary table."""
    cfg, world = run.cfg, run.world
    summary: dict[str, Any] = {}
    run.student.taps.remove()  # hooks off before the ONNX export traces the student
    if world.is_main:
        facts = {
            "seed": cfg.seed,
            "world_size": world.world_size,
            "world_sizes": run.world_sizes,
            "effective_batch": run.global_batch,
            "method": cfg.method,
            "student": cfg.student,
        }
        summary = summarise(read_records(run.logs.metrics), run.epoch_times, facts)
        if cfg.export_onnx:
            path = run.out / "student.onnx"
            summary["onnx"] = str(path)
            summary["onnx_max_abs_diff"] = export_student(
                run.student.model,
                run.source.normalize.channels,
                run.teacher.policy.size,
                path,
                run.preprocess,
            )
        (run.out / "summary.json").write_text(json.dumps(summary, indent=2))
        log(
            json.dumps(
                {k: summary[k] for k in ("best_top1", "last_top1", "onnx_max_abs_diff") if k in summary}
            )
        )
        log(table(summary))
    run.logs.close()
    stop_world(world)
    return summary
