"""The teacher: ONNX loading, taps, graph surgery, preprocessing spec and the onnxruntime runner."""

from kdpipe.teacher.graph import InputInfo, TeacherGraph, load_teacher
from kdpipe.teacher.report import inspect_report
from kdpipe.teacher.runner import TARGET_KINDS, TeacherRunner, make_session
from kdpipe.teacher.spec import TeacherSpec, from_flags, load_card, spec_for
from kdpipe.teacher.taps import TapInfo, auto_taps, resolve_taps

__all__ = [
    "TARGET_KINDS",
    "InputInfo",
    "TapInfo",
    "TeacherGraph",
    "TeacherRunner",
    "TeacherSpec",
    "auto_taps",
    "from_flags",
    "inspect_report",
    "load_card",
    "load_teacher",
    "make_session",
    "resolve_taps",
    "spec_for",
]
