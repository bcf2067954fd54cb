"""Projection heads built from data: depth, widths, output dimension and batch-norm placement."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {"relu": lambda: nn.ReLU(inplace=True), "gelu": nn.GELU}


class Head(nn.Module):
    """An MLP g(h) whose intermediate outputs can be probed (SimCLR Fig. 8, SimCLRv2 head depth).

    depth 0 is the identity, depth 1 a linear map, depth >= 2 has depth-1 hidden layers of
    Linear -> [BatchNorm] -> activation (ReLU, or GELU as in DINO's head) followed by a final Linear (with
    BatchNorm when `last_bn`). A Linear followed by BatchNorm has no bias; the final one has none either
    when `last_bias` is off (MoCo v3's MLPs have none).
    """

    def __init__(
        self,
        in_dim: int,
        depth: int,
        hidden_dim: int,
        out_dim: int,
        batch_norm: bool = True,
        last_bn: bool = False,
        activation: str = "relu",
        last_bias: bool = True,
    ) -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {', '.join(ACTIVATIONS)} (got {activation!r})")
        self.layers = nn.ModuleList()
        previous = in_dim
        for index in range(depth):
            last = index == depth - 1
            width = out_dim if last else hidden_dim
            normalised = batch_norm and (not last or last_bn)
            block: list[nn.Module] = [
                nn.Linear(previous, width, bias=not normalised and (last_bias or not last))
            ]
            if normalised:
                block.append(nn.BatchNorm1d(width, affine=not last))
            if not last:
                block.append(ACTIVATIONS[activation]())
            self.layers.append(nn.Sequential(*block))
            previous = width
        self.out_dim = previous

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            h = layer(h)
        return h

    def intermediate(self, h: torch.Tensor) -> list[torch.Tensor]:
        """Outputs after each layer: [g1(h), g2(g1(h)), ...]; the last is the head's output."""
        outputs = []
        for layer in self.layers:
            h = layer(h)
            outputs.append(h)
        return outputs


def build_head(
    in_dim: int,
    depth: int,
    hidden_dim: int | None,
    out_dim: int,
    batch_norm: bool = True,
    last_bn: bool = False,
    activation: str = "relu",
    last_bias: bool = True,
) -> Head:
    return Head(in_dim, depth, hidden_dim or in_dim, out_dim, batch_norm, last_bn, activation, last_bias)
