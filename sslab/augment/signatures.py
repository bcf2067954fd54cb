"""The augmentation ops' signatures: names, parameters with defaults and bounds, one-line descriptions.

Torch-free, so that view specs can be parsed, validated and written canonically (for trial identities) without
loading the ops themselves; `ops.py` implements each op named here. Defaults follow SimCLR (Chen et al., 2020,
appendix A) and torchvision's transforms.
"""

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

Range = tuple[float, float]
Value = float | Range | bool


@dataclass(frozen=True)
class Param:
    """One op parameter: its default (a float, a (lo, hi) range or a bool) and the allowed values."""

    default: Value
    doc: str
    low: float | None = 0.0  # lower bound for numbers and range ends
    high: float | None = None  # upper bound
    open_low: bool = False  # the lower bound itself is not allowed


@dataclass(frozen=True)
class OpSignature:
    """An op's name, one-line description and parameters (in spec order)."""

    name: str
    doc: str
    params: Mapping[str, Param]
    random: bool = True

    def defaults(self) -> dict[str, Value]:
        return {key: param.default for key, param in self.params.items()}


def _prob(default: float, doc: str) -> Param:
    return Param(default, doc, 0.0, 1.0)


def _declare(name: str, doc: str, *, random: bool = True, **params: Param) -> OpSignature:
    return OpSignature(name, doc, MappingProxyType(params), random)


SIGNATURES: dict[str, OpSignature] = {
    op.name: op
    for op in (
        _declare(
            "crop",
            "random resized crop on whole pixels, antialiased bilinear resize (torchvision's)",
            scale=Param((0.08, 1.0), "area fraction of the box", 0.0, 1.0, open_low=True),
            ratio=Param((0.75, 1.333), "box aspect ratio (width / height), log-uniform", 0.0, open_low=True),
            size=Param(0.0, "output side in pixels; 0 keeps the input size"),
        ),
        _declare(
            "flip",
            "horizontal flip",
            p=_prob(0.5, "probability"),
        ),
        _declare(
            "rotate",
            "rotate by 90, 180 or 270 degrees, chosen uniformly",
        ),
        _declare(
            "cutout",
            "zero one square hole per sample, inside the image",
            size=Param((0.25, 0.5), "hole side as a fraction of the shorter image side", 0.0, 1.0),
            p=_prob(1.0, "probability"),
        ),
        _declare(
            "jitter",
            "colour jitter: brightness, contrast, saturation, hue in an order drawn per image; probability p",
            brightness=Param(0.4, "brightness factor drawn from [1 - b, 1 + b]"),
            contrast=Param(0.4, "contrast factor drawn from [1 - c, 1 + c]"),
            saturation=Param(0.4, "saturation factor drawn from [1 - s, 1 + s]"),
            hue=Param(0.1, "hue shift drawn from [-h, h] turns", 0.0, 0.5),
            p=_prob(0.8, "probability"),
        ),
        _declare(
            "grayscale",
            "convert to grayscale (ITU-R 601-2 luma), replicated to all channels",
            p=_prob(0.2, "probability"),
        ),
        _declare(
            "color",
            "SimCLR colour distortion: jitter(0.8s, 0.8s, 0.8s, 0.2s) with probability p, then grayscale",
            s=Param(1.0, "colour distortion strength", 0.0, 2.5),
            p=_prob(0.8, "probability of the colour jitter"),
            gray=_prob(0.2, "probability of grayscale"),
        ),
        _declare(
            "solarize",
            "invert pixels at or above a threshold",
            threshold=_prob(0.5, "threshold"),
            p=_prob(0.2, "probability"),
        ),
        _declare(
            "noise",
            "additive Gaussian noise, per-sample std drawn from [0, std]",
            std=Param(0.1, "largest std"),
        ),
        _declare(
            "blur",
            "Gaussian blur with per-sample sigma (pixels), kernel side a fraction of the image side",
            sigma=Param((0.1, 2.0), "sigma in pixels", 0.0, open_low=True),
            p=_prob(0.5, "probability"),
            kernel=Param(0.1, "kernel side as a fraction of the shorter image side", 0.0, 1.0, open_low=True),
        ),
        _declare(
            "sobel",
            "Sobel gradient magnitude of the luma, scaled per sample to [0, 1]",
            random=False,
        ),
        _declare(
            "lab",
            "sRGB -> CIE Lab (D65) scaled into [0, 1]: L / 100, (a + 128) / 255, (b + 128) / 255; RGB only",
            random=False,
        ),
        _declare(
            "identity",
            "leave the images unchanged",
            random=False,
        ),
    )
}
