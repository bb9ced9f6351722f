"""Every benchmark script still runs: the CPU ones with tiny arguments, as their docstrings show them,
checking the side-by-side line each one exists to print; the ones that need a GPU or downloaded data
parse their arguments and import everything they use (``--help``)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

REPO = Path(__file__).resolve().parents[2]


def benchmark(script: str, *args: str, cwd: Path, timeout: float = 300) -> str:
    """``python benchmarks/SCRIPT ARGS``; its standard output, after checking that it exited 0."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / script), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"exit {done.returncode}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


@pytest.mark.parametrize("script", ["kernel_parity.py", "pretrain_gpu.py", "train_step.py", "learning.py",
                                    "learning_data.py"])
def test_gpu_and_data_benchmarks_import_and_parse_their_arguments(script, tmp_path):
    if script == "kernel_parity.py":  # no arguments: it runs its checks, which need CUDA
        pytest.importorskip("mamba_ssm")
    assert "usage:" in benchmark(script, "--help", cwd=tmp_path)


def test_objectives_prints_the_teacher_student_ratios(tmp_path):
    out = benchmark("objectives.py", "--embed-dim", "32", "--depth", "2", "--mel", "64", "--frames", "128",
                    "--batch", "2", "--repeats", "1", "--device", "cpu", cwd=tmp_path)
    assert "teacher-student / masked-patch: tokens" in out and "step time" in out


def test_scan_compares_the_scans_and_their_errors(tmp_path):
    out = benchmark("scan.py", "--lengths", "64", "--batch", "1", "--d-inner", "16", "--repeats", "1",
                    "--ref-max-len", "64", "--error-max-len", "64", "--device", "cpu", cwd=tmp_path)
    (row,) = [line.split() for line in out.splitlines() if line.split()[:1] == ["64"]]
    chunked_error, fused_error = float(row[-2]), float(row[-1])
    assert chunked_error < 1e-4 and fused_error < 1e-4  # against float64


def test_efficiency_writes_its_table_and_the_ratio_line(tmp_path):
    out = benchmark("efficiency.py", "--sizes", "tiny", "--models", "ssamba", "ssast-sdpa", "--tokens", "16",
                    "--batch", "1", "--repeats", "1", "--device", "cpu", "--out", str(tmp_path / "eff"), cwd=tmp_path)
    table = pd.read_csv(tmp_path / "eff" / "efficiency.csv")
    assert set(table["model"]) == {"ssamba", "ssast-sdpa"} and (tmp_path / "eff" / "efficiency.png").is_file()
    assert "tiny batch 1" in out


@pytest.mark.xdist_group("benchmarks-ray")
def test_shuffle_prints_shuffled_over_ordered(tmp_path):
    out = benchmark("shuffle.py", "--shards", "2", "--rows", "8", "--repeats", "1", "--batch-size", "4", cwd=tmp_path)
    assert "shuffled / ordered =" in out


@pytest.mark.xdist_group("benchmarks-ray")
def test_ingest_prints_the_pipeline_beside_the_plain_loop_for_each_input(tmp_path):
    out = benchmark("ingest.py", "--cpus", "1", "--inputs", "stored", "stored-zstd", "on-the-fly", "--shards", "2", "--rows", "16", "--clips", "16", "--seconds", "1",
                    "--target-length", "64", "--batch-size", "4", "--warmup", "1", "--timed", "2",
                    "--fly-warmup", "1", "--fly-timed", "1", cwd=tmp_path)
    inputs = {"stored", "stored-zstd", "on-the-fly"}
    rows = {line.split()[0]: line.split()[1:] for line in out.splitlines() if line.split()[:1] and line.split()[0] in inputs}
    assert set(rows) == inputs
    for cpus, pipeline, plain, ratio, _ in rows.values():
        assert cpus == "1" and float(pipeline) > 0  # on the fly too: its tasks share the one CPU and float(plain) > 0
        assert float(ratio) == pytest.approx(float(pipeline) / float(plain), rel=0.02, abs=0.006)  # 2 decimals


@pytest.mark.xdist_group("benchmarks-ray")
def test_featurize_prints_one_process_and_ray_rates_per_format(tmp_path):
    out = benchmark("featurize.py", "--clips", "4", "--cores", "1", cwd=tmp_path)
    rows = {line.split()[0] for line in out.splitlines() if line.split()[:1] in (["WAV"], ["FLAC"])}
    assert rows == {"WAV", "FLAC"}
