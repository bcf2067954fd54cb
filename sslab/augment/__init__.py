"""Per-sample random image augmentations built from view specs.

This package and its spec parsing import no torch; the ops and views that run them live in `ops` and `view`
(import `sslab.augment.view` to augment images).
"""

from .signatures import SIGNATURES, OpSignature, Param
from .spec import canonical_view, describe_ops, parse_steps

__all__ = ["SIGNATURES", "OpSignature", "Param", "canonical_view", "describe_ops", "parse_steps"]
