"""A view: a sequence of augmentation ops applied to a batch with one generator."""

from collections.abc import Iterable

import torch
from torch import Tensor

from sslab.pipeline import PIPELINE_VERSION

from .legacy import ops_at
from .ops import OPS
from .spec import Step, format_steps, parse_steps


class View:
    """Apply steps in order to float (N, C, H, W) images in [0, 1] (C in {1, 3}).

    ``str(view)`` is the canonical spec; ``parse_view(str(view))`` rebuilds an equal view. `pipeline` is
    the version of the ops to run (`sslab.pipeline`; an older one reproduces the trials recorded with it).
    """

    def __init__(self, steps: Iterable[Step] = (), pipeline: int = PIPELINE_VERSION) -> None:
        self.steps: tuple[Step, ...] = tuple(steps) or (Step(OPS["identity"].signature, {}),)
        self.pipeline = pipeline

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(step.op.name for step in self.steps)

    def __call__(self, x: Tensor, generator: torch.Generator) -> Tensor:
        """Augment a batch into a new contiguous float32 tensor (of the same shape unless a crop sets its
        size); `x` is left untouched."""
        if x.ndim != 4 or x.shape[1] not in (1, 3) or x.dtype != torch.float32:
            raise ValueError(
                f"expected float32 images (N, C, H, W) with C in {{1, 3}}, got {x.dtype} {tuple(x.shape)}"
            )
        out = x
        ops = ops_at(self.pipeline)
        for step in self.steps:
            # Intermediate results are ours: let the next op overwrite them instead of copying.
            out = ops[step.op.name].fn(out, generator, **step.params, inplace=_owned(out, x))
        return out if _owned(out, x) else out.clone(memory_format=torch.contiguous_format)

    def __str__(self) -> str:
        return format_steps(self.steps)

    def __repr__(self) -> str:
        return f"View({str(self)!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, View) and (str(self), self.pipeline) == (str(other), other.pipeline)

    def __hash__(self) -> int:
        return hash((str(self), self.pipeline))


def _owned(out: Tensor, x: Tensor) -> bool:
    """Whether `out` is a fresh contiguous tensor: not `x` or a view of it, and safe to write in place."""
    return out.is_contiguous() and out.untyped_storage().data_ptr() != x.untyped_storage().data_ptr()


def parse_view(spec: str, pipeline: int = PIPELINE_VERSION) -> View:
    """Build a view from a spec such as ``"crop(scale=0.08-1),flip,color(s=0.5),blur"``.

    An empty spec (or ``"identity"``) gives the identity view. Raises AugmentError for a bad spec.
    """
    return View(parse_steps(spec), pipeline)
