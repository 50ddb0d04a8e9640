"""kdpipe: cache a teacher's distillation targets once with onnxruntime, train PyTorch students from it."""

__version__ = "0.1.0"
