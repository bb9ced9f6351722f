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
Its backward pass is written out, like the CUDA kernel's: the gradient of a linear recurrence is the
same recurrence run backwards in time, so the backward is one more chunked scan plus a few
elementwise passes, and only the states are kept between forward and backward (autograd through
the scan kept about ten (batch, d_inner, L, d_state) tensors per scan alive, which exhausts 24 GiB
for SSAMBA-tiny at batch 2). :func:`selective_scan_reference` is the step-by-step
recurrence it is tested against.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

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


def linear_scan(
    log_decay: torch.Tensor, drive: torch.Tensor, chunk: int = DEFAULT_CHUNK, reverse: bool = False
) -> torch.Tensor:
    """All states of ``h_t = exp(log_decay_t) ⊙ h_{t−1} + drive_t`` with ``h_{−1} = 0``, or with
    ``reverse=True`` of ``g_t = exp(log_decay_t) ⊙ g_{t+1} + drive_t`` with ``g_L = 0``.

    Inputs and output are ``(..., L, d_state)``; the scan runs along ``L``.
    """
    length = drive.shape[-2]
    if length <= chunk:
        return _sequential_scan(log_decay.exp(), drive, reverse)
    pad = (-length) % chunk  # padding at the end: zero input, no decay; harmless in both directions
    if pad:
        log_decay = F.pad(log_decay, (0, 0, 0, pad))
        drive = F.pad(drive, (0, 0, 0, pad))
    lead, n_chunks, state = drive.shape[:-2], drive.shape[-2] // chunk, drive.shape[-1]
    log_decay = log_decay.reshape(*lead, n_chunks, chunk, state)
    drive = drive.reshape(*lead, n_chunks, chunk, state)

    # 1. Inside every chunk at once, starting from a zero state.
    local = _sequential_scan(log_decay.exp(), drive, reverse)
    # 2. The state entering each chunk: the same recurrence over chunk boundaries, with each chunk's
    #    total decay; then 3. carried through the chunk's decays up to every position.
    cumulative = log_decay.cumsum(dim=-2)
    total = cumulative[..., -1, :]
    if not reverse:
        ends = linear_scan(total, local[..., -1, :], chunk)
        entering = F.pad(ends[..., :-1, :], (0, 0, 1, 0))
        carried = cumulative.exp()
    else:
        starts = linear_scan(total, local[..., 0, :], chunk, reverse=True)
        entering = F.pad(starts[..., 1:, :], (0, 0, 0, 1))
        carried = (total.unsqueeze(-2) - cumulative + log_decay).exp()  # decay from t to the chunk's end
    states = torch.addcmul(local, carried, entering.unsqueeze(-2))
    return states.reshape(*lead, n_chunks * chunk, state)[..., :length, :]


def _sequential_scan(decay: torch.Tensor, drive: torch.Tensor, reverse: bool = False) -> torch.Tensor:
    """The recurrence one step at a time along the second-last axis (vectorised over the others)."""
    decays, drives = decay.unbind(-2), drive.unbind(-2)
    order = range(len(drives) - 1, -1, -1) if reverse else range(len(drives))
    states: list[torch.Tensor] = [None] * len(drives)  # type: ignore[list-item]
    state = None
    for step in order:
        state = drives[step] if state is None else torch.addcmul(drives[step], decays[step], state)
        states[step] = state
    return torch.stack(states, dim=-2)


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
    """Fast pure-PyTorch selective scan (see the module docstring for the maths and shapes)."""
    with torch.autocast(device_type=u.device.type, enabled=False):  # the scan stays in float32
        return _SelectiveScan.apply(u, delta, A, B, C, D, z, delta_bias, delta_softplus, chunk)


class _SelectiveScan(torch.autograd.Function):
    """Forward and hand-written backward, both on chunked scans; only the states are kept between them.

    With δ = softplus(delta + bias), a_t = exp(δ_t A), x_t = δ_t u_t B_t, h_t = a_t h_{t−1} + x_t,
    y = ⟨h, C⟩ + D u and out = y · SiLU(z): the state gradient G_t = ∂L/∂h_t solves the same
    recurrence backwards, G_t = (∂L/∂y_t) C_t + a_{t+1} G_{t+1}; then ∂L/∂x_t = G_t and
    ∂L/∂(δ_t A) = G_t ⊙ a_t h_{t−1} = G_t ⊙ (h_t − x_t)."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, delta_softplus, chunk):
        ctx.input_dtypes = [None if t is None else t.dtype for t in (u, delta, A, B, C, D, z, delta_bias)]
        ctx.delta_softplus, ctx.chunk = delta_softplus, chunk
        out_dtype = u.dtype
        u, delta, A, B, C, D, z, delta_bias = _to_compute_dtype(u, delta, A, B, C, D, z, delta_bias)
        log_decay, drive = _discretize(u, delta, A, B, delta_bias, delta_softplus)
        states = linear_scan(log_decay, drive, chunk)
        y = torch.einsum("bdln,bnl->bdl", states, C)
        if D is not None:
            y = y + D[None, :, None] * u
        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, states, y)
        return (y * F.silu(z) if z is not None else y).to(out_dtype)

    @staticmethod
    def backward(ctx, grad_out):
        u, delta, A, B, C, D, z, delta_bias, states, y = ctx.saved_tensors
        grad_y = grad_out.to(u.dtype)
        grad_z = None
        if z is not None:
            gate = torch.sigmoid(z)
            grad_z = grad_y * y * gate * (1 + z * (1 - gate))
            grad_y = grad_y * z * gate
        grad_D = (grad_y * u).sum(dim=(0, 2)) if D is not None else None
        grad_C = torch.einsum("bdl,bdln->bnl", grad_y, states)

        pre_activation = delta + delta_bias[None, :, None] if delta_bias is not None else delta
        step = F.softplus(pre_activation) if ctx.delta_softplus else pre_activation
        step_u = step * u
        log_decay = step.unsqueeze(-1) * A[None, :, None, :]
        next_log_decay = F.pad(log_decay[..., 1:, :], (0, 0, 0, 1))
        grad_states = linear_scan(next_log_decay, grad_y.unsqueeze(-1) * C.transpose(1, 2).unsqueeze(1),
                                  ctx.chunk, reverse=True)
        drive = step_u.unsqueeze(-1) * B.transpose(1, 2).unsqueeze(1)
        grad_log_decay = grad_states * (states - drive)
        grad_step_u = torch.einsum("bdln,bnl->bdl", grad_states, B)
        grad_B = torch.einsum("bdln,bdl->bnl", grad_states, step_u)
        grad_A = torch.einsum("bdln,bdl->dn", grad_log_decay, step)
        grad_step = torch.einsum("bdln,dn->bdl", grad_log_decay, A) + grad_step_u * u
        grad_u = grad_step_u * step + (grad_y * D[None, :, None] if D is not None else 0)
        grad_pre = grad_step * torch.sigmoid(pre_activation) if ctx.delta_softplus else grad_step
        grad_bias = grad_pre.sum(dim=(0, 2)) if delta_bias is not None else None
        grads = (grad_u, grad_pre, grad_A, grad_B, grad_C, grad_D, grad_z, grad_bias)
        return (*(None if g is None else g.to(dtype) for g, dtype in zip(grads, ctx.input_dtypes)), None, None)


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
