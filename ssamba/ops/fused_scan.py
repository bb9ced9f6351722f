"""Fused CPU selective scan (numba): one pass over time per (batch, channel), the state in registers.

Computes the same function as :mod:`ssamba.ops.selective_scan` (see its docstring for the maths and
the argument shapes), but never builds a ``(batch, d_inner, L, d_state)`` tensor: each (batch,
channel) pair keeps its ``d_state`` state in a small local array and walks the sequence once, and
pairs run in parallel on numba's threads. On a CPU the chunked PyTorch scan spends its time moving
those state-sized tensors through memory, so keeping the state in cache is what makes this fast.

The backward pass is the adjoint recurrence run in reverse. For each (batch, channel) it first
recomputes the forward states into a per-thread ``(L, d_state)`` buffer (which stays in cache for
the sequence lengths SSAMBA uses), then walks back in time. Gradients of B and C are sums over
channels, and those of A, D and the Δ bias sums over the batch: each parallel task writes its own
partial sums, which are added up afterwards, so no two threads write the same memory.

The decays ``exp(Δ_t A_n)`` are the bulk of the arithmetic (one exponential per state per step), and
LLVM has no vector ``exp``: :func:`_fill_decays` computes all ``d_state`` of a step with a
polynomial exponential (Cody-Waite range reduction and the Cephes single-precision polynomial,
≈ 1 ulp; the power of two written straight into the float's exponent bits) that LLVM vectorises.
Arguments below −87 give e^−87 instead of an underflowing value (≈ 1.6e−38, under float32's normal
range: no visible difference), above ≈ 88.4 infinity.

Float32 only: bf16 / fp16 inputs are upcast (the output has u's dtype, like the CUDA kernel) and
float64 stays on the PyTorch path, which the dispatcher in :mod:`ssamba.ops` chooses.
"""

from __future__ import annotations

import math

import numba
import numpy as np
import torch
from numba import prange

# Reassociation lets LLVM vectorise the sums over d_state; no "no NaN / no inf" assumptions, so
# non-finite inputs propagate as in PyTorch.
_FASTMATH = {"nsz", "arcp", "contract", "reassoc"}
_jit = numba.njit(parallel=True, cache=True, fastmath=_FASTMATH, nogil=True)


@numba.njit(inline="always", fastmath=_FASTMATH)
def _step_size(pre: np.float32, softplus: bool) -> np.float32:
    """Δ from delta + bias, with torch's softplus (linear above 20)."""
    if softplus and pre <= np.float32(20.0):
        return np.float32(math.log1p(math.exp(pre)))
    return pre


@numba.njit(inline="always", fastmath=_FASTMATH)
def _fill_decays(step: np.float32, a_row, decay, exponent_bits, scale) -> None:
    """``decay[n] = exp(step · a_row[n])`` for every state n. ``scale`` is ``exponent_bits`` viewed
    as float32: writing ``(k + 127) << 23`` there makes it 2^k without a (non-vectorisable) ldexp."""
    for n in range(a_row.shape[0]):
        x = min(max(step * a_row[n], np.float32(-87.0)), np.float32(89.0))
        k = np.floor(x * np.float32(1.44269504) + np.float32(0.5))  # x = k·ln2 + r, |r| ≤ ln2 / 2
        r = x - k * np.float32(0.693359375) + k * np.float32(2.12194440e-4)  # ln2 in two parts
        p = np.float32(1.9875691500e-4)
        p = p * r + np.float32(1.3981999507e-3)
        p = p * r + np.float32(8.3334519073e-3)
        p = p * r + np.float32(4.1665795894e-2)
        p = p * r + np.float32(1.6666665459e-1)
        p = p * r + np.float32(5.0000001201e-1)
        decay[n] = p * r * r + r + np.float32(1.0)
        exponent_bits[n] = (np.int32(k) + np.int32(127)) << np.int32(23)  # k = 128 gives +inf
    for n in range(a_row.shape[0]):
        decay[n] *= scale[n]


@_jit
def _forward(u, delta, A, B, C, D, z, bias, softplus, has_z, out):
    """``out[b, d, :]`` for every (batch, channel); B and C are ``(batch, L, d_state)``."""
    batch, d_inner, length = u.shape
    d_state = A.shape[1]
    for task in prange(batch * d_inner):
        b, d = task // d_inner, task % d_inner
        h = np.zeros(d_state, dtype=np.float32)
        decay = np.empty(d_state, dtype=np.float32)
        exponent_bits = np.empty(d_state, dtype=np.int32)
        scale = exponent_bits.view(np.float32)
        a_row = A[d]
        for t in range(length):
            step = _step_size(delta[b, d, t] + bias[d], softplus)
            step_u = step * u[b, d, t]
            _fill_decays(step, a_row, decay, exponent_bits, scale)
            y = np.float32(0.0)
            for n in range(d_state):
                h[n] = decay[n] * h[n] + step_u * B[b, t, n]
                y += h[n] * C[b, t, n]
            y += D[d] * u[b, d, t]
            if has_z:
                gate = z[b, d, t]
                y *= gate / (np.float32(1.0) + math.exp(-gate))
            out[b, d, t] = y


@_jit
def _backward(u, delta, A, B, C, D, z, bias, grad_out, softplus, has_z, groups,
              grad_u, grad_delta, grad_z, grad_A, grad_B, grad_C, grad_D, grad_bias):
    """Gradients of every input. Channels are split into ``groups`` contiguous blocks; task (b, g)
    handles batch b and block g, and writes ``grad_B[b, g]`` / ``grad_C[b, g]`` (summed over its
    channels) and ``grad_A[b]``, ``grad_D[b]``, ``grad_bias[b]`` (one row per batch element)."""
    batch, d_inner, length = u.shape
    d_state = A.shape[1]
    per_group = (d_inner + groups - 1) // groups
    for task in prange(batch * groups):
        b, g = task // groups, task % groups
        states = np.empty((length, d_state), dtype=np.float32)  # h_t, recomputed
        decays = np.empty((length, d_state), dtype=np.float32)  # exp(Δ_t A)
        steps = np.empty(length, dtype=np.float32)
        h = np.empty(d_state, dtype=np.float32)
        adjoint = np.empty(d_state, dtype=np.float32)
        exponent_bits = np.empty(d_state, dtype=np.int32)
        scale = exponent_bits.view(np.float32)
        gB, gC = grad_B[b, g], grad_C[b, g]
        gB[:] = 0.0
        gC[:] = 0.0
        for d in range(g * per_group, min(d_inner, (g + 1) * per_group)):
            a_row = A[d]
            # Forward again, keeping the states and decays of this channel.
            h[:] = 0.0
            for t in range(length):
                step = _step_size(delta[b, d, t] + bias[d], softplus)
                steps[t] = step
                step_u = step * u[b, d, t]
                _fill_decays(step, a_row, decays[t], exponent_bits, scale)
                for n in range(d_state):
                    h[n] = decays[t, n] * h[n] + step_u * B[b, t, n]
                    states[t, n] = h[n]
            # Backward in time: adjoint_t = grad_y_t C_t + a_{t+1} adjoint_{t+1}.
            adjoint[:] = 0.0
            grad_A_row = grad_A[b, d]
            grad_D_sum = 0.0
            grad_bias_sum = 0.0
            for t in range(length - 1, -1, -1):
                step = steps[t]
                u_t = u[b, d, t]
                grad_y = grad_out[b, d, t]
                if has_z:
                    y = np.float32(0.0)
                    for n in range(d_state):
                        y += states[t, n] * C[b, t, n]
                    y += D[d] * u_t
                    gate_in = z[b, d, t]
                    sig = np.float32(1.0) / (np.float32(1.0) + math.exp(-gate_in))
                    grad_z[b, d, t] = grad_y * y * sig * (np.float32(1.0) + gate_in * (np.float32(1.0) - sig))
                    grad_y = grad_y * gate_in * sig
                grad_D_sum += grad_y * u_t
                step_u = step * u_t
                grad_step_u = np.float32(0.0)
                grad_step = np.float32(0.0)
                for n in range(d_state):
                    adj = adjoint[n] + grad_y * C[b, t, n]
                    gC[t, n] += grad_y * states[t, n]
                    gB[t, n] += adj * step_u
                    grad_step_u += adj * B[b, t, n]
                    # ∂/∂(Δ_t A_n) = adjoint · a_t · h_{t−1}; the adjoint then carries a_t back.
                    carried = adj * decays[t, n]
                    previous = states[t - 1, n] if t > 0 else np.float32(0.0)
                    grad_log_decay = carried * previous
                    grad_A_row[n] += grad_log_decay * step
                    grad_step += grad_log_decay * a_row[n]
                    adjoint[n] = carried
                grad_step += grad_step_u * u_t
                grad_u[b, d, t] = grad_step_u * step + grad_y * D[d]
                pre = delta[b, d, t] + bias[d]
                if softplus and pre <= np.float32(20.0):
                    grad_step = grad_step / (np.float32(1.0) + math.exp(-pre))
                grad_delta[b, d, t] = grad_step
                grad_bias_sum += grad_step
            grad_D[b, d] = grad_D_sum
            grad_bias[b, d] = grad_bias_sum


def _numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().contiguous().numpy()


def _set_threads() -> None:
    """Use as many threads as torch does (torch.set_num_threads is the one knob for both)."""
    numba.set_num_threads(max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)))


class _FusedScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, delta_softplus):
        ctx.input_dtypes = [None if t is None else t.dtype for t in (u, delta, A, B, C, D, z, delta_bias)]
        ctx.has = (D is not None, z is not None, delta_bias is not None)
        ctx.delta_softplus = delta_softplus
        out_dtype = u.dtype
        f32 = lambda t: t.detach().float().contiguous()  # noqa: E731
        d_inner = u.shape[1]
        u, delta, A = f32(u), f32(delta), f32(A)
        B, C = f32(B.transpose(1, 2)), f32(C.transpose(1, 2))  # (batch, L, d_state): one row per step
        D = f32(D) if D is not None else u.new_zeros(d_inner)
        delta_bias = f32(delta_bias) if delta_bias is not None else u.new_zeros(d_inner)
        z = f32(z) if z is not None else u.new_zeros(1, 1, 1)
        out = torch.empty_like(u)
        _set_threads()
        _forward(*map(_numpy, (u, delta, A, B, C, D, z, delta_bias)), delta_softplus, ctx.has[1], out.numpy())
        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias)
        return out.to(out_dtype)

    @staticmethod
    def backward(ctx, grad_out):
        u, delta, A, B, C, D, z, delta_bias = ctx.saved_tensors
        batch, d_inner, length = u.shape
        d_state = A.shape[1]
        _set_threads()
        groups = max(1, min(d_inner, numba.get_num_threads()))
        grad_u, grad_delta = torch.empty_like(u), torch.empty_like(u)
        grad_z = torch.empty_like(z) if ctx.has[1] else z.new_zeros(1, 1, 1)
        grad_A = u.new_zeros(batch, d_inner, d_state)
        grad_B = u.new_empty(batch, groups, length, d_state)
        grad_C = u.new_empty(batch, groups, length, d_state)
        grad_D, grad_bias = u.new_empty(batch, d_inner), u.new_empty(batch, d_inner)
        _backward(
            *map(_numpy, (u, delta, A, B, C, D, z, delta_bias, grad_out.float())), ctx.delta_softplus, ctx.has[1],
            groups, *(g.numpy() for g in (grad_u, grad_delta, grad_z, grad_A, grad_B, grad_C, grad_D, grad_bias)),
        )
        has_D, has_z, has_bias = ctx.has
        grads = (
            grad_u,
            grad_delta,
            grad_A.sum(0),
            grad_B.sum(1).transpose(1, 2),
            grad_C.sum(1).transpose(1, 2),
            grad_D.sum(0) if has_D else None,
            grad_z if has_z else None,
            grad_bias.sum(0) if has_bias else None,
        )
        return (*(None if g is None else g.to(dtype) for g, dtype in zip(grads, ctx.input_dtypes)), None)


def fused_selective_scan(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
) -> torch.Tensor:
    """The selective scan on CPU tensors, fused (arguments as :func:`ssamba.ops.selective_scan`)."""
    with torch.autocast(device_type="cpu", enabled=False):
        return _FusedScan.apply(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
