"""The ops against independent references (a float64 sequential scan, F.conv1d) and their dispatch."""

import logging
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ssamba import ops
from ssamba.ops.fused_scan import fused_selective_scan
from ssamba.ops.selective_scan import selective_scan, selective_scan_reference


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.double() - expected.double()).abs().max() / expected.double().abs().max().clamp_min(1e-30)).item()


def scan_inputs(batch, d_inner, length, d_state, seed, dtype=torch.float32, full=True):
    g = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.randn(*shape, generator=g, dtype=dtype)  # noqa: E731
    inputs = dict(
        u=rand(batch, d_inner, length),
        delta=0.5 * rand(batch, d_inner, length) if full else 0.5 * rand(batch, d_inner, length).abs(),
        A=-torch.exp(rand(d_inner, d_state).clamp(-2, 2)),
        B=rand(batch, d_state, length),
        C=rand(batch, d_state, length),
    )
    if full:
        inputs.update(D=rand(d_inner), z=rand(batch, d_inner, length), delta_bias=0.1 * rand(d_inner), delta_softplus=True)
    return inputs


SHAPES = [(1, 3, 1, 1), (2, 5, 7, 4), (2, 8, 16, 16), (1, 6, 33, 8), (3, 4, 100, 16), (2, 16, 300, 16)]


def assert_matches_float64(scan, inputs: dict, seed: int) -> None:
    """``scan`` in float32 against the sequential reference in float64: outputs and the gradients of a
    random weighted sum, each within 1e-5 relative error (a gradient that never arrives counts as zero:
    with L = 1, A is unused)."""
    inputs32 = {k: v.requires_grad_() if torch.is_tensor(v) else v for k, v in inputs.items()}
    inputs64 = {k: v.detach().double().requires_grad_() if torch.is_tensor(v) else v for k, v in inputs32.items()}
    out32 = scan(**inputs32)
    out64 = selective_scan_reference(**inputs64)
    assert out32.dtype == torch.float32
    assert relative_error(out32, out64) <= 1e-5
    weights = torch.randn(out64.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    (out32 * weights.float()).sum().backward()
    (out64 * weights).sum().backward()
    for name, tensor in inputs32.items():
        if torch.is_tensor(tensor):
            grad = torch.zeros_like(tensor) if tensor.grad is None else tensor.grad
            assert grad.shape == tensor.shape and grad.dtype == tensor.dtype, name
            assert relative_error(grad, inputs64[name].grad) <= 1e-5, name


@pytest.mark.parametrize("batch,d_inner,length,d_state", SHAPES)
@pytest.mark.parametrize("full", [True, False])
def test_pure_scan_matches_float64_reference_forward_and_gradients(batch, d_inner, length, d_state, full):
    seed = batch * 1000 + length
    assert_matches_float64(selective_scan, scan_inputs(batch, d_inner, length, d_state, seed, full=full), seed)


# Which optional arguments are given: all of them, none, and each alone (the Δ bias without softplus).
VARIANTS = {
    "full": {},
    "bare": dict(D=None, z=None, delta_bias=None, delta_softplus=False),
    "D only": dict(z=None, delta_bias=None, delta_softplus=False),
    "z only": dict(D=None, delta_bias=None, delta_softplus=False),
    "bias, no softplus": dict(D=None, z=None),
    "softplus, no bias": dict(D=None, z=None, delta_bias=None, delta_softplus=True),
}


@pytest.mark.parametrize("batch,d_inner,length,d_state", SHAPES)
@pytest.mark.parametrize("variant", VARIANTS)
def test_fused_scan_matches_float64_reference_forward_and_gradients(batch, d_inner, length, d_state, variant):
    seed = batch * 1000 + length
    inputs = {**scan_inputs(batch, d_inner, length, d_state, seed), **VARIANTS[variant]}
    inputs = {k: v for k, v in inputs.items() if v is not None}
    if not inputs["delta_softplus"]:
        inputs["delta"] = inputs["delta"].abs()  # Δ is a step size: keep it positive without softplus
    assert_matches_float64(fused_selective_scan, inputs, seed)


def test_fused_scan_exponential_against_float64():
    """The vectorisable exp of the decays: within 2 float32 ulp of exp in float64 over the normal
    range, e^-87 (≈ 0) below it, infinity above it, NaN kept."""
    from ssamba.ops.fused_scan import _fill_decays

    x = np.concatenate([np.linspace(-87.0, 88.0, 200_001), [-1e4, -90.0, 0.0, 89.0, 1e4, np.nan]]).astype(np.float32)
    decay, bits = np.empty_like(x), np.empty(len(x), dtype=np.int32)
    _fill_decays(np.float32(1.0), x, decay, bits, bits.view(np.float32))
    normal = slice(0, 200_001)
    exact = np.exp(x[normal].astype(np.float64))
    assert np.max(np.abs(decay[normal] - exact) / exact) <= 2 * np.finfo(np.float32).eps
    assert decay[-6] == decay[-5] == np.float32(np.exp(np.float64(-87.0))) and decay[-4] == 1.0
    assert np.isinf(decay[-3]) and np.isinf(decay[-2]) and np.isnan(decay[-1])


def test_fused_scan_takes_strided_inputs_and_strong_decay():
    inputs = scan_inputs(2, 6, 64, 8, seed=11)
    inputs["delta"] = inputs["delta"].abs() * 50  # exp(Δ·A) underflows to 0 in places
    inputs["u"] = torch.randn(2, 64, 6).transpose(1, 2)  # not contiguous, as the mixer's slices may be
    inputs["B"] = torch.randn(2, 64, 8).transpose(1, 2)
    out = fused_selective_scan(**inputs)
    assert torch.isfinite(out).all()
    assert relative_error(out, selective_scan_reference(**{k: v.double() if torch.is_tensor(v) else v for k, v in inputs.items()})) <= 1e-5


def test_fused_scan_upcasts_bfloat16_and_returns_bfloat16_with_bfloat16_gradients():
    inputs = scan_inputs(1, 4, 40, 8, seed=5)
    bf16 = {k: v.bfloat16().requires_grad_() if torch.is_tensor(v) and k in ("u", "delta", "z") else v for k, v in inputs.items()}
    out = fused_selective_scan(**bf16)
    assert out.dtype == torch.bfloat16
    reference = selective_scan_reference(**{k: v.detach().double() if torch.is_tensor(v) else v for k, v in bf16.items()})
    assert relative_error(out, reference) < 1e-2
    out.float().sum().backward()
    assert bf16["u"].grad.dtype == torch.bfloat16 and torch.isfinite(bf16["u"].grad.float()).all()


def test_fused_scan_uses_torch_thread_count():
    import numba

    inputs = scan_inputs(2, 4, 20, 4, seed=2)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = fused_selective_scan(**inputs)
        assert numba.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)
    torch.testing.assert_close(fused_selective_scan(**inputs), single)


@pytest.mark.parametrize("chunk", [2, 3, 4, 16])
def test_chunk_size_changes_nothing(chunk):
    inputs = scan_inputs(2, 4, 77, 8, seed=7, dtype=torch.float64)
    torch.testing.assert_close(selective_scan(**inputs, chunk=chunk), selective_scan_reference(**inputs), rtol=1e-12, atol=1e-12)


def test_strong_decay_does_not_overflow():
    inputs = scan_inputs(1, 4, 256, 16, seed=3)
    inputs["delta"] = inputs["delta"].abs() * 50  # exp(Δ·A) underflows to 0 in places
    out = selective_scan(**inputs)
    assert torch.isfinite(out).all()
    assert relative_error(out, selective_scan_reference(**{k: v.double() if torch.is_tensor(v) else v for k, v in inputs.items()})) <= 1e-5


def test_bfloat16_inputs_scan_in_float32_and_return_bfloat16():
    inputs = scan_inputs(1, 4, 40, 8, seed=5)
    bf16 = {k: v.bfloat16() if torch.is_tensor(v) and k in ("u", "delta", "z") else v for k, v in inputs.items()}
    out = selective_scan(**bf16)
    assert out.dtype == torch.bfloat16
    reference = selective_scan_reference(**{k: v.double() if torch.is_tensor(v) else v for k, v in bf16.items()})
    assert relative_error(out, reference) < 1e-2


@pytest.mark.parametrize("width", [2, 4])
@pytest.mark.parametrize("activation", [None, "silu"])
def test_causal_conv_matches_conv1d(width, activation):
    g = torch.Generator().manual_seed(width)
    x = torch.randn(2, 6, 29, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(6, width, generator=g, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(6, generator=g, dtype=torch.float64, requires_grad=True)
    expected = F.conv1d(x, weight.unsqueeze(1), bias, padding=width - 1, groups=6)[..., :29]
    if activation:
        expected = F.silu(expected)
    actual = ops.causal_conv1d_pure(x, weight, bias, activation)
    torch.testing.assert_close(actual, expected)
    grads = torch.autograd.grad(actual.sum(), (x, weight, bias))
    expected_grads = torch.autograd.grad(expected.sum(), (x, weight, bias))
    for a, e in zip(grads, expected_grads):
        torch.testing.assert_close(a, e)


def test_causal_conv_never_looks_ahead():
    x = torch.zeros(1, 1, 10)
    x[..., 5] = 1.0
    out = ops.causal_conv1d_pure(x, torch.ones(1, 4))
    assert torch.equal(out[0, 0], torch.tensor([0, 0, 0, 0, 0, 1, 1, 1, 1, 0.0]))


def scan_paths(caplog, **inputs) -> list[str]:
    """Run ops.selective_scan twice and return the paths it announced."""
    ops._announced.clear()
    with caplog.at_level(logging.INFO, logger="ssamba.ops"):
        ops.selective_scan(**inputs)
        ops.selective_scan(**inputs)
    return [r.getMessage() for r in caplog.records if "selective_scan runs on" in r.getMessage()]


def test_cpu_dispatch_prefers_the_fused_scan_and_says_so_once(caplog):
    inputs = scan_inputs(1, 2, 5, 2, seed=1)
    assert scan_paths(caplog, **inputs) == ["selective_scan runs on the fused CPU (numba) path"]
    torch.testing.assert_close(ops.selective_scan(**inputs), fused_selective_scan(**inputs))


def test_float64_and_forced_pure_use_the_chunked_scan(caplog):
    inputs = scan_inputs(1, 2, 5, 2, seed=1)
    double = {k: v.double() if torch.is_tensor(v) else v for k, v in inputs.items()}
    assert scan_paths(caplog, **double) == ["selective_scan runs on the pure PyTorch path"]
    caplog.clear()
    ops.force_pure_ops(True)
    try:
        assert scan_paths(caplog, **inputs) == ["selective_scan runs on the pure PyTorch path"]
        torch.testing.assert_close(ops.selective_scan(**inputs), selective_scan(**inputs))
    finally:
        ops.force_pure_ops(False)


def test_pure_ops_environment_variable_forces_the_pure_path():
    script = (
        "import logging, torch; logging.basicConfig(level=logging.INFO, format='%(message)s')\n"
        "from ssamba import ops\n"
        "x = torch.randn(1, 2, 5)\n"
        "ops.selective_scan(x, x.abs(), -torch.ones(2, 3), torch.randn(1, 3, 5), torch.randn(1, 3, 5))\n"
    )
    env = {**os.environ, "SSAMBA_PURE_OPS": "1"}
    finished = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
    assert "selective_scan runs on the pure PyTorch path" in finished.stderr
    assert "fused" not in finished.stderr


def broken_package(folder, name: str) -> str:
    """A ``name`` package under ``folder`` whose import fails, as a wheel built for another torch would."""
    (folder / name).mkdir()
    (folder / name / "__init__.py").write_text(f"raise ImportError('{name} is broken on this machine')\n")
    return str(folder)


def test_a_cpu_without_the_fused_scan_warns_once_and_runs_the_chunked_scan(tmp_path):
    script = (
        "import torch\nfrom ssamba import ops\nx = torch.randn(1, 3, 5)\n"
        "for _ in range(2):\n"
        "    ops.selective_scan(x, x.abs(), -torch.ones(3, 2), torch.randn(1, 2, 5), torch.randn(1, 2, 5))\n"
    )
    env = {**os.environ, "PYTHONPATH": broken_package(tmp_path, "numba")}
    finished = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
    assert finished.stderr.count("the fused CPU selective scan cannot be imported (numba is broken") == 1, finished.stderr


def test_a_gpu_without_the_kernels_warns_once_naming_each(tmp_path):
    """No GPU here: CUDA is reported present, and the kernel packages fail to import."""
    script = ("import torch\ntorch.cuda.is_available = lambda: True\nfrom ssamba import ops\n"
              "assert not ops.kernels_available() and not ops.kernels_available()\n")
    folder = broken_package(tmp_path, "mamba_ssm")
    broken_package(tmp_path, "causal_conv1d")
    finished = subprocess.run([sys.executable, "-c", script], env={**os.environ, "PYTHONPATH": folder},
                              capture_output=True, text=True, check=True)
    assert finished.stderr.count("the mamba_ssm selective-scan kernel cannot be imported") == 1, finished.stderr
    assert finished.stderr.count("the causal_conv1d kernel cannot be imported") == 1, finished.stderr
    assert "install mamba-ssm for this torch and CUDA" in finished.stderr


@pytest.mark.skipif(not (torch.cuda.is_available() and ops.kernels_available()), reason="needs CUDA and mamba-ssm")
def test_cuda_kernel_comes_before_the_fused_scan(caplog):
    inputs = {k: v.cuda() if torch.is_tensor(v) else v for k, v in scan_inputs(1, 2, 5, 2, seed=1).items()}
    assert scan_paths(caplog, **inputs) == ["selective_scan runs on the mamba_ssm CUDA kernel path"]


@pytest.mark.parametrize("chunk", [2, 3, 5, 16])
def test_reverse_scan_is_the_forward_scan_backwards_in_time(chunk):
    from ssamba.ops.selective_scan import linear_scan

    g = torch.Generator().manual_seed(chunk)
    log_decay = -torch.rand(2, 3, 41, 4, generator=g, dtype=torch.float64)
    drive = torch.randn(2, 3, 41, 4, generator=g, dtype=torch.float64)
    expected = linear_scan(log_decay.flip(-2), drive.flip(-2), chunk=10**6).flip(-2)  # sequential
    torch.testing.assert_close(linear_scan(log_decay, drive, chunk, reverse=True), expected)
    torch.testing.assert_close(linear_scan(log_decay, drive, chunk), linear_scan(log_decay, drive, chunk=10**6))
