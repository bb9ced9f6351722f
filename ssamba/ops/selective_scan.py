"""Pure-PyTorch selective scan (Mamba's S6 recurrence) and its sequential reference.

Both functions take mamba-ssm's ``selective_scan_fn`` arguments and return the same result:

    Δ  = softplus(delta + delta_bias)              (softplus and bias optional)
    h_t = exp(Δ_t · A) ⊙ h_{t−1} + (Δ_t · u_t) B_t
    y_t = ⟨h_t, C_t⟩ + D ⊙ u_t,   then  y ⊙ SiLU(z)  when a gate z is given

Shapes: u, delta, z ``(batch, d_inner, L)``; A ``(d_inner, d_state)``; B, C ``(batch, d_state, L)``;
D, delta_bias ``(d_inner,)``. Computation runs in float32 (float64 stays float64); the output has
u's dtype, like the CUDA kernel.

:func:`selective_scan` is the fast path: a chunked scan that runs the recurrence inside fixed-size
chunks for all chunks at once, then links the chunks with the same scan applied recursively to the
chunk boundaries, so the number of Python-level steps grows like ``chunk · log_chunk(L)`` instead of
``L``. It performs the same multiply-adds as the recurrence (no division by decays, so no overflow).
Autograd provides the backward pass, over a recomputation of the scan (activation checkpointing). :func:`selective_scan_reference` is the step-by-step
recurrence it is tested against.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

DEFAULT_CHUNK = 16


def _discretize(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    delta_bias: torch.Tensor | None,
    delta_softplus: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-step log-decay ``Δ·A`` and input ``Δ·u·B``, both ``(batch, d_inner, L, d_state)``."""
    if delta_bias is not None:
        delta = delta + delta_bias[None, :, None].to(delta.dtype)
    if delta_softplus:
        delta = F.softplus(delta)
    log_decay = delta.unsqueeze(-1) * A[None, :, None, :]
    drive = (delta * u).unsqueeze(-1) * B.transpose(1, 2).unsqueeze(1)
    return log_decay, drive


def _skip_and_gate(y: torch.Tensor, u: torch.Tensor, D: torch.Tensor | None, z: torch.Tensor | None) -> torch.Tensor:
    """``y + D·u``, gated by SiLU(z)."""
    if D is not None:
        y = y + D[None, :, None] * u
    if z is not None:
        y = y * F.silu(z)
    return y


def _to_compute_dtype(*tensors: torch.Tensor | None) -> list[torch.Tensor | None]:
    """Scan in float32 (float64 stays float64), like the kernel, whatever the input precision."""
    dtype = torch.float64 if tensors[0].dtype == torch.float64 else torch.float32
    return [None if t is None else t.to(dtype) for t in tensors]


def linear_scan(log_decay: torch.Tensor, drive: torch.Tensor, chunk: int = DEFAULT_CHUNK) -> torch.Tensor:
    """All states of ``h_t = exp(log_decay_t) ⊙ h_{t−1} + drive_t`` with ``h_{−1} = 0``.

    Inputs and output are ``(..., L, d_state)``; the scan runs along ``L``.
    """
    length = drive.shape[-2]
    if length <= chunk:
        return _sequential_scan(log_decay.exp(), drive)
    pad = (-length) % chunk
    if pad:
        log_decay = F.pad(log_decay, (0, 0, 0, pad))
        drive = F.pad(drive, (0, 0, 0, pad))
    lead, n_chunks, state = drive.shape[:-2], drive.shape[-2] // chunk, drive.shape[-1]
    log_decay = log_decay.reshape(*lead, n_chunks, chunk, state)
    drive = drive.reshape(*lead, n_chunks, chunk, state)

    # 1. Inside every chunk at once, starting from a zero state.
    local = _sequential_scan(log_decay.exp(), drive, dim=-2)
    # 2. The state entering each chunk: the same recurrence over chunk ends, with the chunk's total decay.
    cumulative = log_decay.cumsum(dim=-2)
    chunk_ends = linear_scan(cumulative[..., -1, :], local[..., -1, :], chunk)
    entering = F.pad(chunk_ends[..., :-1, :], (0, 0, 1, 0))
    # 3. Carry the entering state through each chunk's decays.
    states = local + cumulative.exp() * entering.unsqueeze(-2)
    return states.reshape(*lead, n_chunks * chunk, state)[..., :length, :]


def _sequential_scan(decay: torch.Tensor, drive: torch.Tensor, dim: int = -2) -> torch.Tensor:
    """The recurrence one step at a time along ``dim`` (vectorised over every other axis)."""
    # unbind, not indexing: its backward is one stack instead of a zero-filled tensor per step.
    decays, drives = decay.unbind(dim), drive.unbind(dim)
    state = drives[0]
    states = [state]
    for step in range(1, len(drives)):
        state = torch.addcmul(drives[step], decays[step], state)
        states.append(state)
    return torch.stack(states, dim=dim)


def selective_scan(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    chunk: int = DEFAULT_CHUNK,
) -> torch.Tensor:
    """Fast pure-PyTorch selective scan (see the module docstring for the maths and shapes).

    When gradients are needed the scan is recomputed in the backward pass (activation
    checkpointing), like the CUDA kernel does: autograd would otherwise keep about ten tensors of
    shape (batch, d_inner, L, d_state) per scan alive until the backward pass, 48 scans per encoder
    pass, which exhausts a 24 GiB machine for SSAMBA-tiny at batch 2."""
    args = (u, delta, A, B, C, D, z, delta_bias, delta_softplus, chunk)
    needs_grad = torch.is_grad_enabled() and any(torch.is_tensor(t) and t.requires_grad for t in args)
    with torch.autocast(device_type=u.device.type, enabled=False):  # the scan stays in float32
        if needs_grad:
            return checkpoint(_selective_scan, *args, use_reentrant=False)
        return _selective_scan(*args)


def _selective_scan(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None,
    z: torch.Tensor | None,
    delta_bias: torch.Tensor | None,
    delta_softplus: bool,
    chunk: int,
) -> torch.Tensor:
    out_dtype = u.dtype
    u, delta, A, B, C, D, z, delta_bias = _to_compute_dtype(u, delta, A, B, C, D, z, delta_bias)
    log_decay, drive = _discretize(u, delta, A, B, delta_bias, delta_softplus)
    states = linear_scan(log_decay, drive, chunk)
    y = torch.einsum("bdln,bnl->bdl", states, C)
    return _skip_and_gate(y, u, D, z).to(out_dtype)


def selective_scan_reference(
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
    """The recurrence one time step at a time, written like mamba-ssm's ``selective_scan_ref``:
    slow, obviously correct, the tests' and the benchmark's yardstick."""
    out_dtype = u.dtype
    u, delta, A, B, C, D, z, delta_bias = _to_compute_dtype(u, delta, A, B, C, D, z, delta_bias)
    log_decay, drive = _discretize(u, delta, A, B, delta_bias, delta_softplus)
    decay = log_decay.exp()
    state = u.new_zeros(u.shape[0], u.shape[1], A.shape[1])
    outputs = []
    for t in range(u.shape[-1]):
        state = decay[:, :, t] * state + drive[:, :, t]
        outputs.append(torch.einsum("bdn,bn->bd", state, C[:, :, t]))
    return _skip_and_gate(torch.stack(outputs, dim=-1), u, D, z).to(out_dtype)
