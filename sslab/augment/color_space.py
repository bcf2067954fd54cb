"""sRGB -> CIE L*a*b* (D65 white), the standard formulas.

sRGB values in [0, 1] are linearised (IEC 61966-2-1), mapped to CIE XYZ with the sRGB/D65 matrix, divided by
the white point (the matrix's row sums, so that white maps to a* = b* = 0 exactly) and compressed with the
CIE cube-root function f. Results: L* in [0, 100], a* and b* in roughly [-86, 98] and [-108, 95] on sRGB.
"""

import torch
from torch import Tensor

# sRGB (linear) -> XYZ, D65 white (IEC 61966-2-1; Lindbloom's 7-digit values)
_RGB_TO_XYZ = (
    (0.4124564, 0.3575761, 0.1804375),
    (0.2126729, 0.7151522, 0.0721750),
    (0.0193339, 0.1191920, 0.9503041),
)
_DELTA = 6 / 29  # the CIE f() switches from the cube root to a line below t = delta^3

# Scale of the `lab` augmentation op: L / 100, (a + 128) / 255, (b + 128) / 255 puts Lab into [0, 1].
LAB_OFFSET = (0.0, 128.0, 128.0)
LAB_SCALE = (100.0, 255.0, 255.0)


def srgb_to_linear(x: Tensor) -> Tensor:
    """Undo the sRGB transfer curve: values in [0, 1] -> linear light in [0, 1]."""
    return torch.where(x <= 0.04045, x / 12.92, ((x + 0.055) / 1.055).pow(2.4))


def rgb_to_lab(x: Tensor) -> Tensor:
    """CIE L*a*b* (D65) of sRGB images (..., 3, H, W) in [0, 1]: L* in [0, 100], a* and b* unbounded units."""
    if x.ndim < 3 or x.shape[-3] != 3:
        raise ValueError(f"rgb_to_lab needs RGB images (..., 3, H, W), got shape {tuple(x.shape)}")
    matrix = torch.tensor(_RGB_TO_XYZ, dtype=x.dtype, device=x.device)  # (3, 3)
    xyz = torch.einsum("ij,...jhw->...ihw", matrix, srgb_to_linear(x.clamp(0, 1)))  # (..., 3, H, W)
    white = matrix.sum(dim=1).view(3, 1, 1)  # XYZ of RGB (1, 1, 1)
    t = xyz / white
    f = torch.where(t > _DELTA**3, t.clamp_min(_DELTA**3).pow(1 / 3), t / (3 * _DELTA**2) + 4 / 29)
    fx, fy, fz = f.unbind(dim=-3)
    lightness = 116 * fy - 16
    return torch.stack([lightness, 500 * (fx - fy), 200 * (fy - fz)], dim=-3)  # (..., 3, H, W)


def rgb_to_lab_unit(x: Tensor) -> Tensor:
    """Lab of sRGB images (..., 3, H, W) scaled into [0, 1]: L / 100, (a + 128) / 255, (b + 128) / 255."""
    lab = rgb_to_lab(x)
    offset = torch.tensor(LAB_OFFSET, dtype=x.dtype, device=x.device).view(3, 1, 1)
    scale = torch.tensor(LAB_SCALE, dtype=x.dtype, device=x.device).view(3, 1, 1)
    return lab.add_(offset).div_(scale).clamp_(0, 1)
