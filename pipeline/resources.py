"""CPUs for the input pipeline: Train workers must not take every CPU that Ray Data needs.

Ray Data reads, crops and batches the training examples in tasks of their own; when the Train
workers hold every CPU of the cluster those tasks never start and training waits at 0 rows without
a word. The check runs on the driver before the trainer starts and fails with the numbers and the fix.
An elastic run (``num_workers: [min, max]``) is checked at the size Ray Train starts it with: as
many workers as the cluster has CPUs for, at most ``max``.
"""

from __future__ import annotations

from pipeline.config import ConfigError, ScalingSection

DATA_CPUS = 1.0  # what the input pipeline needs at the least: one read/transform task at a time


class ClusterTooSmall(ConfigError):
    """The cluster cannot hold the Train workers and the input pipeline together."""


def starting_workers(cluster_cpus: float, scaling: ScalingSection) -> int:
    """The workers Ray Train starts the run with: the fixed number, or for an elastic run as many
    as the cluster's CPUs hold, at most its ``max``."""
    low, high = scaling.worker_range
    return min(high, int(cluster_cpus // scaling.cpus_per_worker)) if scaling.elastic else high


def check_data_cpus(cluster_cpus: float, scaling: ScalingSection, data_cpus: float = DATA_CPUS) -> None:
    """Raise :class:`ClusterTooSmall` when the workers would fit but leave the data pipeline fewer than
    ``data_cpus``. A cluster too small for the (fewest) workers is left to Ray Train, which waits for
    the autoscaler to add nodes (and times out on a fixed cluster); local mode (no workers) reserves nothing."""
    workers = starting_workers(cluster_cpus, scaling)
    train_cpus = workers * scaling.cpus_per_worker
    if workers == 0 or workers < scaling.worker_range[0] or cluster_cpus < train_cpus \
            or cluster_cpus - train_cpus >= data_cpus:
        return
    most = max(0, int((cluster_cpus - data_cpus) // scaling.cpus_per_worker))
    field = "scaling.num_workers (its max)" if scaling.elastic else "scaling.num_workers"
    raise ClusterTooSmall(
        f"scaling: {workers} Train workers x {scaling.cpus_per_worker:g} CPUs = {train_cpus:g} of the "
        f"cluster's {cluster_cpus:g} CPUs leave {cluster_cpus - train_cpus:g} for the input pipeline (Ray Data), which "
        f"needs at least {data_cpus:g}: training would wait for data forever. Lower {field} (at most "
        f"{most} here) or scaling.cpus_per_worker, or add CPUs to the cluster.")


def train_cpus(scaling: ScalingSection) -> float:
    """CPUs a Ray Train run holds at its largest (local mode holds none: it trains in its driver)."""
    return scaling.worker_range[1] * scaling.cpus_per_worker


def sweep_concurrency(cluster_cpus: float, trial_cpus: float, configured: int | None, field: str) -> int:
    """How many trials may run at once: each holds its own CPUs (``trial_cpus``: its process, its Train
    workers) plus :data:`DATA_CPUS` for its own input pipeline. Tune would otherwise start trials until
    their Train workers hold every CPU and their data tasks never run. ``configured`` (the user's bound)
    is capped at what fits; :class:`ClusterTooSmall` when not even one trial fits."""
    per_trial = trial_cpus + DATA_CPUS
    fits = int(cluster_cpus // per_trial)
    if fits < 1:
        raise ClusterTooSmall(
            f"{field}: one trial needs {per_trial:g} CPUs ({trial_cpus:g} for the trial and its Train workers, "
            f"{DATA_CPUS:g} for its input pipeline), the cluster has {cluster_cpus:g}: use fewer Train workers or "
            "CPUs per worker, or add CPUs to the cluster")
    return min(fits, configured) if configured else fits


def check_cluster(scaling: ScalingSection) -> None:
    """:func:`check_data_cpus` against the CPUs of the running Ray cluster."""
    import ray

    check_data_cpus(ray.cluster_resources().get("CPU", 0.0), scaling)
