"""The resolved configuration of a distillation run, and which of its settings a resume may change."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kdpipe.errors import KdpipeError


@dataclass
class DistillConfig:
    """The resolved configuration of a run (written to RUN/config.json)."""

    data: str
    out: str
    student: str = "resnet20"
    student_kwargs: dict[str, Any] = field(default_factory=dict)
    method: str = "kd"
    weights: dict[str, float] = field(default_factory=dict)
    at_tap_weights: list[float] = field(default_factory=list)  # per AT tap pair; empty: all 1
    term_warmup: dict[str, float] = field(default_factory=dict)  # term -> epochs of a linear ramp from 0
    cache: str | None = None
    online_teacher: str | None = None
    val_data: str | None = None
    student_taps: str | list[str] = "auto"
    teacher_taps: str | list[str] = "auto"  # a cache: which cached taps pair (kdpipe.pairing); online: --taps
    teacher_card: str | None = None  # online teacher only: YAML card with its preprocessing
    views: int = 0  # online teacher only (a cache brings its own)
    augment: str = "auto"  # online teacher only
    view_pad: int = 4  # online teacher only
    view_flip: bool = True  # online teacher only
    view_seed: int = 0  # online teacher only
    dct_variant: str | None = None
    teacher_correct_mask: bool = False
    flip_symmetry: bool = False  # grad-at: add the student's horizontal-flip symmetry term ("flip")
    grad_form: str = "full"  # online teacher only: the form of J_T (a cache brings its own)
    temperature: float = 4.0
    epochs: int = 10
    batch_size: int = 128  # per process; see global_batch
    global_batch: int = 0  # samples per step over all processes (0: batch_size x processes)
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
    log_every: int = 0  # steps between records in step_metrics.jsonl; 0 = about 50 per epoch
    checkpoint_every: int = 0  # steps between mid-epoch checkpoints; 0 = at epoch ends only
    tensorboard: bool = True  # write RUN/tensorboard/ when the tensorboard package is installed
    verify: bool = True  # check every chunk's crc32 of the arrays used before training (--no-verify)
    order: str = "random"  # "random" | "chunked" | "chunked:SAMPLES" (kdpipe.train.order)


def per_rank_batch(cfg: DistillConfig, world_size: int) -> int:
    """Samples per step on each process: ``global_batch / world_size`` when a global batch is given."""
    if cfg.epochs < 1 or cfg.batch_size < 1 or cfg.global_batch < 0:
        raise KdpipeError("--epochs and --batch-size must be >= 1 (and --global-batch >= 0)")
    if cfg.log_every < 0 or cfg.checkpoint_every < 0:
        raise KdpipeError("--log-every and --checkpoint-every must be >= 0 (0: the default)")
    if not cfg.global_batch:
        return cfg.batch_size
    if cfg.global_batch % world_size:
        raise KdpipeError(
            f"--global-batch {cfg.global_batch} does not split over {world_size} processes: "
            "choose a multiple of the process count"
        )
    return cfg.global_batch // world_size


# Settings a resumed run may change: they do not alter what is trained (or only extend it). The batch
# is compared as the global batch (per-process batch x processes), so the world size may change.
RESUME_FREE = {
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
    "log_every",
    "checkpoint_every",
    "tensorboard",
    "batch_size",
    "global_batch",
}


def check_resumable(state: dict[str, Any], now: dict[str, Any], global_batch: int, out: Path) -> None:
    """Refuse (one line) a resume whose settings would change what is trained."""
    saved = state.get("config", {})
    diff = sorted(k for k in saved if k not in RESUME_FREE and k in now and saved[k] != now[k])
    what = [f"{k} {saved[k]!r} -> {now[k]!r}" for k in diff]
    saved_global = state.get("global_batch", saved.get("batch_size"))
    if saved_global is not None and saved_global != global_batch:
        what.append(
            f"global batch {saved_global} -> {global_batch} (pass --global-batch {saved_global} to keep "
            "it with another number of processes)"
        )
    if what:
        raise KdpipeError(
            f"--resume: {out} was started with other settings ({', '.join(what)}); resume with the "
            "original settings, or choose another --out"
        )
