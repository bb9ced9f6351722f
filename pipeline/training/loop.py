"""What the pretraining and fine-tuning loops share, written once: the model behind DDP, sums and
gathers across workers, learning-rate scaling, seeding, precision, the MLflow handle of rank 0 and
the console lines that show a run's progress.

Each loop (``pipeline.pretrain.train_loop``, ``pipeline.finetune.fit``) reads top to bottom in
named steps and calls these helpers; where it runs (a Ray Train worker or a Tune trial) is hidden
behind :class:`pipeline.training.trainer.Worker`.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from datetime import timedelta
from typing import Any, Callable, ContextManager

import torch
import torch.distributed as dist
import torch.nn.functional as F

from pipeline.runtime.tracking import RunTracker
from pipeline.training.trainer import LoopConfig, Worker
from ssamba import ops

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------------
# Model, reductions, seeding, precision
# --------------------------------------------------------------------------------------------------


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model itself, without the DDP wrapper ``prepare_model`` may have put around it."""
    return getattr(model, "module", model)


def distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Each value summed over the workers (in float64: sums of many per-clip scores)."""
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    if distributed():
        dist.all_reduce(tensor)
    return tensor.tolist()


def node_count(worker: Worker) -> int:
    """How many Ray nodes the run's workers are on (every worker must ask: it is a collective). By
    node id: Ray Train's node rank counts IP addresses, and several nodes may share one."""
    if not distributed():
        return 1
    ids: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(ids, worker.node_id)
    return len(set(ids))


def all_gather_rows(rows: torch.Tensor) -> torch.Tensor:
    """Every worker's ``rows``, concatenated (workers may hold different numbers of rows)."""
    if not distributed():
        return rows
    count = torch.tensor([rows.shape[0]], device=rows.device)
    counts = [torch.zeros_like(count) for _ in range(dist.get_world_size())]
    dist.all_gather(counts, count)
    padded = F.pad(rows, (0, 0, 0, int(torch.cat(counts).max()) - rows.shape[0]))
    parts = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(parts, padded)
    return torch.cat([part[: int(n)] for part, n in zip(parts, counts)])


def seed_worker(seed: int, rank: int) -> None:
    """Different but reproducible torch randomness (dropout, drop-path, init) on every worker."""
    torch.manual_seed(seed + rank)


def effective_precision(device: torch.device, precision: str) -> str:
    """bf16 autocast runs on CUDA only; elsewhere the loop computes in fp32."""
    return "bf16" if device.type == "cuda" and precision == "bf16" else "fp32"


def autocast(device: torch.device, precision: str) -> Callable[[], ContextManager]:
    """A factory of the forward pass's autocast context for ``precision`` on ``device``."""
    if effective_precision(device, precision) == "bf16":
        return lambda: torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext


# --------------------------------------------------------------------------------------------------
# Learning rates
# --------------------------------------------------------------------------------------------------


def gradient_sync(model: torch.nn.Module, sync: bool) -> ContextManager:
    """Gradient accumulation under DDP: gradients are averaged across workers on the last micro-batch
    of an optimizer step only (``no_sync`` before it)."""
    return contextlib.nullcontext() if sync or not hasattr(model, "no_sync") else model.no_sync()


def optimizer_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, grad_clip: float | None) -> None:
    """Clip the global gradient norm (when configured), step, and clear the gradients."""
    if grad_clip is not None:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def base_rates(optimizer: torch.optim.Optimizer) -> list[float]:
    """The configured rate of each parameter group (read right after building the optimizer)."""
    return [group["lr"] for group in optimizer.param_groups]


def set_learning_rates(optimizer: torch.optim.Optimizer, rates: list[float], factor: float) -> None:
    for group, rate in zip(optimizer.param_groups, rates):
        group["lr"] = rate * factor


# --------------------------------------------------------------------------------------------------
# Tracking and console output (rank 0)
# --------------------------------------------------------------------------------------------------


def rank0_tracker(loop: LoopConfig, worker: Worker, params: Callable[[], dict[str, Any]],
                   documents: dict[str, dict] | None = None) -> RunTracker | None:
    """Rank 0's handle on the MLflow run the driver opened (other ranks: None). A run without params
    yet gets ``params()`` and ``documents`` (JSON artifacts); a resumed one keeps what it has."""
    if worker.rank != 0:
        return None
    tracker = RunTracker.attach(loop.tracking_uri, loop.run_id, loop.system_metrics)
    if not tracker.has_params():
        tracker.log_params(params())
        for name, document in (documents or {}).items():
            tracker.log_dict(document, name)
    return tracker


def say(line: str) -> None:
    """One progress line on stdout, flushed (Ray forwards worker output to the driver and job logs).
    Written to the stream rather than printed: Ray Train patches ``print`` in its workers to log the
    line as well as print it, and the driver then shows every line twice."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def announce_compute(device: torch.device, precision: str, world_size: int, global_batch: int) -> None:
    """Rank 0's first line: which operators run where, and at what scale. CUDA without the kernels
    is a warning: the pure-PyTorch scan works there but is several times slower."""
    say(f"compute: {ops.compute_path(device)} | device {device} | precision {precision} | "
        f"world size {world_size} | global batch {global_batch}")
    if device.type == "cuda" and not ops.kernels_available():
        log.warning("CUDA is present but the mamba_ssm / causal_conv1d kernels are not importable: "
                    "training runs the slower pure-PyTorch operators (install the kernels, see README)")


def _duration(seconds: float) -> str:
    return str(timedelta(seconds=round(max(0.0, seconds))))


class Clock:
    """Elapsed time and estimated time left of one launch that goes from ``start`` to ``total``
    units (steps or epochs; a resumed launch starts past zero)."""

    def __init__(self, start: int, total: int) -> None:
        self.start, self.total, self.began = start, total, time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.began

    def timing(self, done: int) -> str:
        elapsed = self.elapsed()
        per_unit = elapsed / max(1, done - self.start)
        return f"elapsed {_duration(elapsed)} | ETA {_duration(per_unit * (self.total - done))}"


def format_metrics(metrics: dict[str, float]) -> str:
    return " | ".join(f"{name} {value:.4f}" for name, value in metrics.items())
