"""The bidirectional Mamba mixer of Vision Mamba ("bimamba v2"), as SSAMBA uses it (docs/model.md#mixer).

One input projection produces ``x`` and the gate ``z`` for both directions. The forward branch reads
the sequence left to right; the backward branch reads the same ``(x, z)`` flipped, with its own
depthwise conv, ``x_proj``, ``dt_proj``, ``A`` and ``D``, and is flipped back. The two are averaged
(``if_devide_out=True`` in the official scripts) and go through one shared output projection.

Parameter names equal the official ones, so official checkpoints load by name.

:meth:`BiMambaMixer.forward_lean` computes the same function with its tensors stored channel-major
(``(channels, batch·L)``, the layout the CUDA kernels read), so that the projections are plain
matrix products with no transposed copies; with ``reverse=True`` it gives the mixer's output on the
reversed sequence, flipped back, without flipping its input or output (see its docstring).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ssamba import fastpath, ops


def _inverse_softplus(x: torch.Tensor) -> torch.Tensor:
    return x + torch.log(-torch.expm1(-x))


class BiMambaMixer(nn.Module):
    def __init__(
        self,
        d_model: int,
        d_state: int = 16,
        d_conv: int = 4,
        expand: int = 2,
        dt_min: float = 1e-3,
        dt_max: float = 0.1,
        dt_init_floor: float = 1e-4,
        divide_out: bool = True,
    ) -> None:
        super().__init__()
        self.d_model, self.d_state, self.d_conv = d_model, d_state, d_conv
        self.d_inner = expand * d_model
        self.dt_rank = math.ceil(d_model / 16)
        self.divide_out = divide_out
        d_inner, dt_rank = self.d_inner, self.dt_rank

        self.in_proj = nn.Linear(d_model, 2 * d_inner, bias=False)
        self.out_proj = nn.Linear(d_inner, d_model, bias=False)
        # Forward direction.
        self.conv1d = nn.Conv1d(d_inner, d_inner, d_conv, groups=d_inner, padding=d_conv - 1, bias=True)
        self.x_proj = nn.Linear(d_inner, dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(dt_rank, d_inner, bias=True)
        self.A_log = nn.Parameter(self._s4d_real_log(d_inner, d_state))
        self.D = nn.Parameter(torch.ones(d_inner))
        # Backward direction: same shapes, its own weights.
        self.conv1d_b = nn.Conv1d(d_inner, d_inner, d_conv, groups=d_inner, padding=d_conv - 1, bias=True)
        self.x_proj_b = nn.Linear(d_inner, dt_rank + 2 * d_state, bias=False)
        self.dt_proj_b = nn.Linear(dt_rank, d_inner, bias=True)
        self.A_b_log = nn.Parameter(self._s4d_real_log(d_inner, d_state))
        self.D_b = nn.Parameter(torch.ones(d_inner))
        for param in (self.A_log, self.D, self.A_b_log, self.D_b):
            param._no_weight_decay = True

        self._init_forward_dt_proj(dt_min, dt_max, dt_init_floor)

    @staticmethod
    def _s4d_real_log(d_inner: int, d_state: int) -> torch.Tensor:
        """``A = −[1, 2, …, N]`` for every channel, stored as ``log``."""
        return torch.log(torch.arange(1, d_state + 1, dtype=torch.float32)).repeat(d_inner, 1)

    def _init_forward_dt_proj(self, dt_min: float, dt_max: float, dt_init_floor: float) -> None:
        """Mamba's Δ init for the forward branch only: weight ``U(±R^-½)``, bias ``softplus⁻¹(Δ₀)``
        with ``Δ₀`` log-uniform in ``[dt_min, dt_max]``. The bias is flagged so that the encoder's
        bias zeroing skips it. ``dt_proj_b`` keeps PyTorch's default init and has its bias zeroed
        by the encoder init, as in the official code (docs/model.md#initialisation)."""
        bound = self.dt_rank**-0.5
        nn.init.uniform_(self.dt_proj.weight, -bound, bound)
        dt = torch.exp(
            torch.rand(self.d_inner) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)
        ).clamp(min=dt_init_floor)
        with torch.no_grad():
            self.dt_proj.bias.copy_(_inverse_softplus(dt))
        self.dt_proj.bias._no_reinit = True

    def _scan_direction(
        self,
        x: torch.Tensor,
        z: torch.Tensor,
        conv: nn.Conv1d,
        x_proj: nn.Linear,
        dt_proj: nn.Linear,
        A_log: torch.Tensor,
        D: torch.Tensor,
    ) -> torch.Tensor:
        """Causal conv + SiLU, input-dependent (Δ, B, C), selective scan gated by SiLU(z).

        ``x`` and ``z`` are ``(batch, d_inner, L)``; so is the result."""
        x = ops.causal_conv1d(x, conv.weight.squeeze(1), conv.bias, activation="silu")
        x_dbl = x_proj(x.transpose(1, 2))  # (batch, L, R + 2N)
        dt, B, C = torch.split(x_dbl, [self.dt_rank, self.d_state, self.d_state], dim=-1)
        delta = (dt @ dt_proj.weight.T).transpose(1, 2)  # bias and softplus happen inside the scan
        A = -torch.exp(A_log.float())
        return ops.selective_scan(
            x,
            delta.contiguous(),
            A,
            B.transpose(1, 2).contiguous(),
            C.transpose(1, 2).contiguous(),
            D.float(),
            z=z,
            delta_bias=dt_proj.bias.float(),
            delta_softplus=True,
        )

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """``(batch, L, d_model)`` → ``(batch, L, d_model)``."""
        if fastpath.use_lean_forward(hidden):
            return self.forward_lean(hidden)
        xz = self.in_proj(hidden).transpose(1, 2)  # (batch, 2E, L)
        x, z = xz.chunk(2, dim=1)
        x, z = x.contiguous(), z.contiguous()
        y_forward = self._scan_direction(x, z, self.conv1d, self.x_proj, self.dt_proj, self.A_log, self.D)
        y_backward = self._scan_direction(
            x.flip(-1), z.flip(-1), self.conv1d_b, self.x_proj_b, self.dt_proj_b, self.A_b_log, self.D_b
        ).flip(-1)
        y = y_forward + y_backward
        if self.divide_out:
            y = y / 2
        return self.out_proj(y.transpose(1, 2))

    def forward_lean(self, hidden: torch.Tensor, reverse: bool = False) -> torch.Tensor:
        """:meth:`forward` with channel-major tensors; ``reverse=True`` returns ``forward(hidden.flip(1)).flip(1)``.

        The projections act per token, so reversing the input reverses ``x`` and ``z``; the forward
        branch then scans the original sequence backwards and the backward branch scans it forwards.
        Reversing the mixer therefore only swaps which parameter set scans which way."""
        batch, length, _ = hidden.shape
        d_inner = self.d_inner
        xz = self.in_proj.weight @ hidden.reshape(batch * length, self.d_model).t()  # (2E, batch·L)
        xz = xz.view(2 * d_inner, batch, length).transpose(0, 1)  # (batch, 2E, L), stored channel-major
        forward_params = (self.conv1d, self.x_proj, self.dt_proj, self.A_log, self.D)
        backward_params = (self.conv1d_b, self.x_proj_b, self.dt_proj_b, self.A_b_log, self.D_b)
        along, against = (backward_params, forward_params) if reverse else (forward_params, backward_params)
        y = self._scan_lean(xz, *along)
        y_against = self._scan_lean(xz.flip(-1), *against).flip(-1)
        del xz
        inference = not torch.is_grad_enabled()
        y = y.add_(y_against) if inference else y + y_against
        del y_against
        if self.divide_out:
            y = y.div_(2) if inference else y / 2
        out = fastpath.channel_major(y).t() @ self.out_proj.weight.t()  # (batch·L, d_model)
        return out.view(batch, length, self.d_model)

    def _scan_lean(
        self,
        xz: torch.Tensor,
        conv: nn.Conv1d,
        x_proj: nn.Linear,
        dt_proj: nn.Linear,
        A_log: torch.Tensor,
        D: torch.Tensor,
    ) -> torch.Tensor:
        """:meth:`_scan_direction` on ``xz`` ``(batch, 2E, L)``; intermediates stay channel-major."""
        batch, _, length = xz.shape
        # With gradients, the kernels get the standard layouts the reference forward gives them: their
        # backward is verified on those (benchmarks/kernel_parity.py); channel-major only in inference.
        layout = torch.Tensor.contiguous if torch.is_grad_enabled() else _same
        x, z = (layout(half) for half in xz.chunk(2, dim=1))
        x = ops.causal_conv1d(x, conv.weight.squeeze(1), conv.bias, activation="silu")
        x_dbl = x_proj.weight @ fastpath.channel_major(x)  # (R + 2N, batch·L)
        dt, B, C = torch.split(x_dbl, [self.dt_rank, self.d_state, self.d_state], dim=0)
        delta = dt_proj.weight @ dt  # (E, batch·L); bias and softplus happen inside the scan

        def batch_first(tensor: torch.Tensor) -> torch.Tensor:
            return layout(tensor.view(tensor.shape[0], batch, length).transpose(0, 1))

        return ops.selective_scan(
            x,
            batch_first(delta),
            -torch.exp(A_log.float()),
            batch_first(B),
            batch_first(C),
            D.float(),
            z=z,
            delta_bias=dt_proj.bias.float(),
            delta_softplus=True,
        )


def _same(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


def init_mixer_weights(module: nn.Module, n_layer: int) -> None:
    """Vim's ``_init_weights`` applied module by module (docs/model.md#initialisation): zero every Linear bias not
    flagged ``_no_reinit``, and re-draw each ``out_proj.weight`` kaiming-uniform scaled by ``1/√n_layer``."""
    if isinstance(module, nn.Linear) and module.bias is not None:
        if not getattr(module.bias, "_no_reinit", False):
            nn.init.zeros_(module.bias)
    if isinstance(module, BiMambaMixer):
        nn.init.kaiming_uniform_(module.out_proj.weight, a=math.sqrt(5))
        with torch.no_grad():
            module.out_proj.weight /= math.sqrt(n_layer)
