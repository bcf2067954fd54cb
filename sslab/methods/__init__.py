"""Methods, one file each, behind the interface in `base`."""

from sslab.methods import (
    barlow,  # noqa: F401
    byol,  # noqa: F401
    dino,  # noqa: F401
    instdisc,  # noqa: F401
    moco,  # noqa: F401
    mocov3,  # noqa: F401
    simclr,  # noqa: F401  (registers itself)
    simsiam,  # noqa: F401
    supervised,  # noqa: F401
    swav,  # noqa: F401
)
from sslab.methods.base import METHODS, Method, StepOutput, build_method

__all__ = ["METHODS", "Method", "StepOutput", "build_method"]
