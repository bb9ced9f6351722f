"""The encoder's lean forward: when it runs, and its fused residual-add + norm.

The lean forward (``BiMambaMixer.forward_lean`` and the encoder's lean flip-pair loop) computes the
same function as the reference code with fewer memory passes: no flipped copies of the block's
hidden and residual streams, the mixer's tensors kept channel-major so that no projection needs a
transposed copy, and the residual add fused into the norm. By default it runs on CUDA tensors and
the reference code on the CPU (the CPU path stays exactly as it was); :func:`set_lean_forward`
forces either, e.g. to compare the two.

On CUDA the residual add + norm use mamba-ssm's Triton layer norm when it is importable (one kernel
for add, norm and, in inference, both norms of a flip-pair); otherwise plain PyTorch.
"""

from __future__ import annotations

import logging
from functools import lru_cache
from typing import Callable

import torch
from torch import nn

log = logging.getLogger(__name__)
_lean_mode: bool | None = None


def set_lean_forward(enabled: bool | None) -> None:
    """``True``/``False`` forces the lean / reference forward everywhere; ``None`` (default): lean on CUDA."""
    global _lean_mode
    _lean_mode = enabled


def use_lean_forward(tensor: torch.Tensor) -> bool:
    return tensor.is_cuda if _lean_mode is None else _lean_mode


@lru_cache(maxsize=1)
def _triton_layer_norm() -> Callable | None:
    try:
        from mamba_ssm.ops.triton.layer_norm import layer_norm_fn
    except Exception as error:
        log.info("mamba-ssm Triton layer norm unavailable: %s", error)
        return None
    return layer_norm_fn


def _fused(hidden: torch.Tensor) -> Callable | None:
    return _triton_layer_norm() if hidden.is_cuda else None


def _norm_args(norm: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None, float, bool]:
    is_rms = isinstance(norm, nn.RMSNorm)
    return norm.weight, None if is_rms else norm.bias, norm.eps, is_rms


def add_norm(
    hidden: torch.Tensor, residual: torch.Tensor | None, norm: nn.Module
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(norm(residual + hidden), residual + hidden)``; ``residual=None`` means no add."""
    fused = _fused(hidden)
    if fused is not None:
        weight, bias, eps, is_rms = _norm_args(norm)
        normed, summed = fused(hidden, weight, bias, residual=residual, eps=eps, prenorm=True, is_rms_norm=is_rms)
        return normed, summed
    summed = hidden if residual is None else residual + hidden
    return norm(summed), summed


def add_norm_pair(
    hidden: torch.Tensor, residual: torch.Tensor | None, norm_a: nn.Module, norm_b: nn.Module
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(norm_a(s), norm_b(s), s)`` with ``s = residual + hidden``: one pass over ``s`` where fused."""
    fused = _fused(hidden)
    if fused is not None and type(norm_a) is type(norm_b):
        weight, bias, eps, is_rms = _norm_args(norm_a)
        weight1, bias1, _, _ = _norm_args(norm_b)
        return fused(hidden, weight, bias, residual=residual, weight1=weight1, bias1=bias1, eps=eps,
                     prenorm=True, is_rms_norm=is_rms)
    normed_a, summed = add_norm(hidden, residual, norm_a)
    return normed_a, norm_b(summed), summed


def channel_major(tensor: torch.Tensor) -> torch.Tensor:
    """``(batch, C, L)`` → ``(C, batch·L)``: a view when the tensor is stored channel-major, else a copy."""
    return tensor.transpose(0, 1).reshape(tensor.shape[1], -1)

