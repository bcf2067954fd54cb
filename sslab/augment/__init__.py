"""Batched, per-sample random image augmentations built from view specs."""

from .ops import OPS, OpInfo, Param
from .spec import describe_ops
from .view import View, parse_view

__all__ = ["OPS", "OpInfo", "Param", "View", "describe_ops", "parse_view"]
