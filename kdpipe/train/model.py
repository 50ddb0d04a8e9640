"""The student with its taps, the method (the loss, with its learned parts) and the pairing of
student taps with teacher taps, as one :class:`DistillModule`."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from kdpipe.errors import KdpipeError
from kdpipe.targets import TargetPlan
from kdpipe.train.config import DistillConfig
from kdpipe.train.teacher import TeacherSource


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def target_names_for(
    kinds: set[str], num_taps: int, dct_variant: str, taps: list[int] | None = None
) -> list[str]:
    """Cache array names a method reads, e.g. {"at", "logits"} -> ["logits", "at.0", "at.1", ...]
    (for the source's taps ``taps`` when given, else the first ``num_taps``)."""
    names = ["logits"] if "logits" in kinds else []
    for i in range(num_taps) if taps is None else taps:
        names += [f"at.{i}"] if "at" in kinds else []
        names += [f"dct.{dct_variant}.{i}"] if "dct" in kinds else []
        names += [f"pooled.{i}"] if "pooled" in kinds else []
    return names + (["grad"] if "grad" in kinds else [])


class DistillModule(nn.Module):
    """Student + method (its learned parts, e.g. AFD's meta-network) as one module, so that DDP sees
    every trained parameter and the loss is computed inside forward."""

    def __init__(self, student: nn.Module, taps: Any, method: Any, input_norm: Any = None) -> None:
        super().__init__()
        self.student = student
        self.taps = taps
        self.method = method  # an nn.Module: its learned parts (AFD) train and checkpoint with the student
        self.input_norm = input_norm  # the student's Normalize: J_S is taken w.r.t. the [0, 1] image

    def forward(self, x: torch.Tensor, y: torch.Tensor, teacher: dict[str, torch.Tensor]) -> Any:
        """x (B,C,H,W) float32, y (B,) int64, teacher: array name -> (B, ...) -> (loss, terms, logits).
        Methods with grad-at/flip take the student's input gradients with their graphs first."""
        if not self.method.needs_input_grad:
            logits = self.student(x)
            loss, terms = self.method(logits, y, self.taps.features, teacher)
            return loss, terms, logits
        from kdpipe.losses.grad_at import student_grads

        flip = "flip" in self.method.terms
        logits, grad, flipped = student_grads(self.student, x, y, self.input_norm, flip)
        loss, terms = self.method(logits, y, self.taps.features, teacher, grad, flipped)
        return loss, terms, logits


def parse_run_method(cfg: DistillConfig, teacher: TeacherSource) -> tuple[Any, TargetPlan]:
    """The method of ``cfg`` and the teacher arrays it reads (``plan.read``, checked against the
    source) and derives on the device (``plan.complete``)."""
    from kdpipe.losses import parse_method

    variant = cfg.dct_variant or (teacher.dct_variants[0] if teacher.dct_variants else "dft-abs")
    if variant not in teacher.dct_variants and not teacher.derives_dct():  # at maps give any variant
        raise KdpipeError(
            f"--dct-variant {variant!r}: the teacher targets hold {', '.join(teacher.dct_variants)}"
        )
    method = parse_method(cfg.method, cfg.weights or None, T=cfg.temperature,
                          label_smoothing=cfg.label_smoothing, dct_variant=variant,
                          dct_mask=cfg.teacher_correct_mask, flip_symmetry=cfg.flip_symmetry,
                          at_tap_weights=cfg.at_tap_weights, warmup=cfg.term_warmup)  # fmt: skip
    method.grad_form = teacher.grad_form
    plan = teacher.plan(method.required_targets, variant)
    teacher.check_targets(plan.read, cfg.method, method.required_targets)
    return method, plan


@dataclass
class Student:
    """The student, its taps (forward hooks) and the (C, (H, W)) of each tap on the run's input size."""

    model: nn.Module
    taps: Any
    chans: list[int]
    hw: list[tuple[int, ...]]


def build_student(cfg: DistillConfig, num_classes: int, in_chans: int, size: int, sync_bn: bool) -> Student:
    """Create the student (seeded by ``cfg.seed``), hook its taps and probe their shapes.
    ``sync_bn``: BatchNorm over the global batch (several processes)."""
    from kdpipe.student import StudentTaps, create_model
    from kdpipe.train.ddp import global_batchnorm

    seed_everything(cfg.seed)
    model = create_model(cfg.student, num_classes=num_classes, in_chans=in_chans, **cfg.student_kwargs)
    if sync_bn:
        global_batchnorm(model)
    taps = StudentTaps(model, cfg.student_taps)
    with torch.no_grad():
        model.eval()
        model(torch.zeros(2, in_chans, size, size))
        model.train()
    chans = [int(f.shape[1]) for f in taps.features]
    hw = [tuple(f.shape[2:]) for f in taps.features]
    return Student(model, taps, chans, hw)


def pair_taps(
    cfg: DistillConfig, method: Any, student: Student, teacher: TeacherSource
) -> list[tuple[int, int]]:
    """(student tap, teacher tap) pairs: one to one for AT/DCT, all to all for AFD, none otherwise.

    ``--teacher-taps`` picks among a cache's taps first. When the counts differ and the teacher or the
    student is a transformer, the side with more taps keeps as many as the other has, evenly spaced
    and ending at its last (:mod:`kdpipe.pairing`); both sides are narrowed to the pairs.
    """
    from kdpipe.pairing import pair_indices, select_cached

    if teacher.cache is not None and cfg.teacher_taps != "auto":
        teacher.select(select_cached(teacher.taps, cfg.teacher_taps, teacher.where))
    one_to_one = bool({"at", "dct"} & set(method.terms))
    transformer = teacher.transformer or bool(getattr(student.model, "kd_transformer", False))
    if one_to_one and len(student.chans) != len(teacher.chans) and transformer:
        s_idx, t_idx = pair_indices(len(student.chans), len(teacher.chans))
        teacher.select(t_idx)
        narrow_student(student, s_idx)
    if one_to_one and len(student.chans) != len(teacher.chans):
        raise KdpipeError(
            f"method {cfg.method!r} pairs student and teacher taps one to one, but the student has "
            f"{len(student.chans)} ({', '.join(student.taps.names)}) and the teacher {len(teacher.chans)}: "
            "choose --student-taps (or --taps at cache time) to match, or use afd"
        )
    if one_to_one:
        return [(i, i) for i in range(len(teacher.chans))]
    if method.needs_build:
        return [(s, t) for t in range(len(teacher.chans)) for s in range(len(student.chans))]
    return []


def narrow_student(student: Student, keep: list[int]) -> None:
    """Hook only the student taps ``keep`` (indices into the current taps)."""
    from kdpipe.student import StudentTaps

    if keep == list(range(len(student.chans))):
        return
    names = [student.taps.names[i] for i in keep]
    student.taps.remove()
    student.taps = StudentTaps(student.model, names)
    student.chans = [student.chans[i] for i in keep]
    student.hw = [student.hw[i] for i in keep]


def describe_taps(
    name: str, method: Any, student: Student, teacher: TeacherSource, pairing: list[tuple[int, int]]
) -> list[str]:
    """The lines a run prints about the taps of student ``name`` and how they pair with the teacher's."""
    lines = [f"student {name} taps: " + ", ".join(
        f"{n} {c}x{h}x{w}" for n, c, (h, w) in zip(student.taps.names, student.chans, student.hw, strict=True)
    )]  # fmt: skip
    if pairing and not {"at", "dct"} & set(method.terms):
        lines.append(f"  AFD: each of {len(teacher.chans)} teacher tap(s) attends over all "
                     f"{len(student.chans)} student tap(s)")  # fmt: skip
    else:
        lines += [f"  pair student {student.taps.names[s]} {student.hw[s]} <- {teacher_tap(teacher, t)}"
                  for s, t in pairing]  # fmt: skip
    return lines


def teacher_tap(teacher: TeacherSource, t: int) -> str:
    """How a run names teacher tap ``t``: cached index, block number (transformers), grid."""
    i = teacher.selected[t] if teacher.selected is not None else t
    info = teacher.taps[t] if t < len(teacher.taps) else {}
    block = f" (block {info['block']})" if info.get("block") else ""
    return f"teacher tap {i}{block} {tuple(teacher.hw[t])}"


def build_module(
    cfg: DistillConfig,
    method: Any,
    student: Student,
    teacher: TeacherSource,
    device: torch.device,
    sync_bn: bool,
    input_norm: Any = None,
) -> DistillModule:
    """Build the method's learned parts (AFD) for these taps and put student + method on ``device``."""
    from kdpipe.train.ddp import global_batchnorm

    if method.needs_build:
        method.build(student.chans, teacher.chans)
    if sync_bn:
        global_batchnorm(method)
    module = DistillModule(student.model, student.taps, method, input_norm).to(device)
    if cfg.channels_last:
        module = module.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    return module
