"""Methods, one file each, behind the interface in `base`."""

from sslab.methods import simclr  # noqa: F401  (registers itself)
from sslab.methods.base import METHODS, Method, StepOutput, build_method

__all__ = ["METHODS", "Method", "StepOutput", "build_method"]
