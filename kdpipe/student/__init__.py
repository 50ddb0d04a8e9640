"""Student model zoo, registry (zoo names and user factories) and forward-hook taps."""

from kdpipe.student.registry import check_output, create_model, list_models, register_model
from kdpipe.student.taps import StudentTaps, auto_blocks, auto_taps

__all__ = [
    "StudentTaps",
    "auto_blocks",
    "auto_taps",
    "check_output",
    "create_model",
    "list_models",
    "register_model",
]
