"""Distillation losses on cached teacher targets, one module per method, and the method composer."""

from kdpipe.losses.afd import AFD
from kdpipe.losses.at import at_loss, attention_map
from kdpipe.losses.ce import ce_loss
from kdpipe.losses.compose import TERMS, Method, default_weights, parse_method
from kdpipe.losses.dct import dct_loss, dct_transform
from kdpipe.losses.kd import kd_loss

__all__ = [
    "AFD",
    "TERMS",
    "Method",
    "at_loss",
    "attention_map",
    "ce_loss",
    "dct_loss",
    "dct_transform",
    "default_weights",
    "kd_loss",
    "parse_method",
]
