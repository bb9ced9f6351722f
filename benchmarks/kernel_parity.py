"""GPU check: the mamba-ssm / causal-conv1d CUDA kernels against the pure-PyTorch ops.

Compares forward outputs and input gradients in float32 and bfloat16 for the selective scan, the
causal conv and a whole bidirectional mixer, then the encoder's lean CUDA forward against its
reference forward (both on the kernels; fp32 output within 1e-5 relative, and gradients), and prints one line per check and a final
``N passed, M failed``. Needs a CUDA GPU with the ``cuda`` extra (or the lent machine's wheels) and
only ``torch`` + ``ssamba`` (run with ``PYTHONPATH=.``).
"""

from __future__ import annotations

import sys

import torch

from ssamba import EncoderConfig, PatchGrid, SSAMBAEncoder, fastpath, ops
from ssamba.mixer import BiMambaMixer

TOLERANCE = {torch.float32: 1e-3, torch.bfloat16: 5e-2}  # max error relative to the output's max


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-12)).item()


def compare(name: str, run, inputs: dict, dtype: torch.dtype) -> bool:
    """Run ``run(pure: bool, **inputs)`` both ways; compare outputs and gradients of every input."""
    results = []
    for pure in (False, True):
        ops.force_pure_ops(pure)
        leaves = {k: v.detach().clone().requires_grad_() if torch.is_tensor(v) and v.is_floating_point() else v
                  for k, v in inputs.items()}
        out = run(**leaves)
        out.float().pow(2).mean().backward()
        results.append((out, {k: v.grad for k, v in leaves.items() if torch.is_tensor(v) and v.grad is not None}))
    ops.force_pure_ops(False)
    (kernel_out, kernel_grads), (pure_out, pure_grads) = results
    errors = {"out": relative(kernel_out, pure_out)}
    errors.update({f"d{k}": relative(kernel_grads[k], pure_grads[k]) for k in pure_grads})
    worst = max(errors.values())
    ok = worst <= TOLERANCE[dtype]
    print(f"{'PASS' if ok else 'FAIL'} {name:<28} {str(dtype):<15} worst {worst:.2e}  "
          + " ".join(f"{k}={v:.1e}" for k, v in errors.items()))
    return ok


def compare_lean_encoder(dtype: torch.dtype) -> bool:
    """Lean against reference encoder forward (kernels in both), output and every gradient."""
    torch.manual_seed(0)
    encoder = SSAMBAEncoder(EncoderConfig.from_size("tiny", grid=PatchGrid(target_length=4096))).cuda().train()
    features = torch.randn(2, 4096, 128, device="cuda")
    weights = torch.randn(2, encoder.config.grid.num_patches + 1, encoder.embed_dim, device="cuda")
    results = []
    for lean in (True, False):
        fastpath.set_lean_forward(None if lean else False)
        torch.manual_seed(1)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            out = encoder(features)
        (out.float() * weights).sum().backward()  # not a norm of the output: the final LayerNorm fixes that
        results.append((out.detach(), {n: p.grad.clone() for n, p in encoder.named_parameters()}))
        encoder.zero_grad()
    fastpath.set_lean_forward(None)
    (lean_out, lean_grads), (ref_out, ref_grads) = results
    out_error = ((lean_out.float() - ref_out.float()).norm() / ref_out.float().norm()).item()
    grad_error = max(relative(lean_grads[n], ref_grads[n]) for n in ref_grads)
    ok = out_error <= (1e-5 if dtype == torch.float32 else 2e-2) and grad_error <= TOLERANCE[dtype]
    print(f"{'PASS' if ok else 'FAIL'} {'lean vs reference encoder':<28} {str(dtype):<15} "
          f"out (norm-relative) {out_error:.2e}  worst gradient {grad_error:.2e}")
    return ok


def main() -> int:
    if not (torch.cuda.is_available() and ops.kernels_available()):
        print("CUDA kernels are not available here: nothing to compare")
        return 1
    device = "cuda"
    g = torch.Generator(device=device).manual_seed(0)
    outcomes = []
    for dtype in (torch.float32, torch.bfloat16):
        b, d, n, L = 2, 384, 16, 1024
        rand = lambda *shape, dt=dtype: torch.randn(*shape, generator=g, device=device).to(dt)  # noqa: E731
        scan_inputs = dict(
            u=rand(b, d, L), delta=0.5 * rand(b, d, L), A=-torch.rand(d, n, generator=g, device=device).add(0.5),
            B=rand(b, n, L), C=rand(b, n, L), D=torch.ones(d, device=device),  # B, C: the input's dtype, as x_proj gives them
            z=rand(b, d, L), delta_bias=0.1 * rand(d, dt=torch.float32),
        )
        outcomes.append(compare("selective_scan", lambda **kw: ops.selective_scan(**kw, delta_softplus=True), scan_inputs, dtype))
        conv_inputs = dict(x=rand(b, d, L), weight=rand(d, 4), bias=rand(d))
        outcomes.append(compare("causal_conv1d+silu", lambda **kw: ops.causal_conv1d(**kw, activation="silu"), conv_inputs, dtype))
        torch.manual_seed(0)
        mixer = BiMambaMixer(192).to(device=device, dtype=dtype)
        outcomes.append(compare("bimamba v2 mixer", lambda hidden: mixer(hidden), {"hidden": rand(b, L, 192)}, dtype))  # noqa: B023 - called at once
    for dtype in (torch.float32, torch.bfloat16):
        outcomes.append(compare_lean_encoder(dtype))
    passed = sum(outcomes)
    print(f"{passed} passed, {len(outcomes) - passed} failed")
    return 0 if passed == len(outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
