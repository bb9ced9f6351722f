"""Pure-PyTorch causal depthwise 1-D convolution (+ optional SiLU), the ``causal_conv1d_fn`` contract.

``x`` is ``(batch, channels, L)``, ``weight`` ``(channels, width)``. Output position ``t`` sees inputs
``t − width + 1 … t`` (implicit zero left padding), so no position looks ahead. It is written as a sum of
shifted copies of the input, which for Mamba's width of 4 is cheaper than a grouped convolution and is
checked against ``torch.nn.functional.conv1d`` in the tests.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def causal_conv1d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str | None = None,
) -> torch.Tensor:
    if activation not in (None, "silu", "swish"):
        raise ValueError(f"activation must be None, 'silu' or 'swish', got {activation!r}")
    width, length = weight.shape[-1], x.shape[-1]
    padded = F.pad(x, (width - 1, 0))
    out = sum(weight[None, :, k, None] * padded[..., k : k + length] for k in range(width))
    if bias is not None:
        out = out + bias[None, :, None]
    return F.silu(out) if activation is not None else out
