"""`kdpipe distill`: training students from a teacher cache (or an online teacher).

One module per job:

- ``config``      DistillConfig, the per-process batch, what a resume may change
- ``teacher``     the teacher source: the cache or an online onnxruntime teacher, one interface
- ``model``       the student with its taps, the method, the tap pairing, DistillModule
- ``optim``       optimiser, learning-rate schedule, mixed precision
- ``order``       the data order: each step's samples and views on this rank
- ``ddp``         torchrun: process group, device, BatchNorm over the global batch
- ``checkpoint``  crash-safe checkpoints (epoch ends and every N steps) and the resume that finds them
- ``logs``        metrics.jsonl, step_metrics.jsonl, TensorBoard
- ``evaluation``, ``export``, ``summary``   validation, the ONNX student, summary.json and its table
- ``loop``        distill(): setup, the epoch loop and the training step
"""

from kdpipe.train.config import DistillConfig
from kdpipe.train.evaluation import evaluate
from kdpipe.train.export import export_student
from kdpipe.train.loop import distill
from kdpipe.train.model import DistillModule, target_names_for
from kdpipe.train.optim import lr_at, make_optimizer

__all__ = [
    "DistillConfig",
    "DistillModule",
    "distill",
    "evaluate",
    "export_student",
    "lr_at",
    "make_optimizer",
    "target_names_for",
]
