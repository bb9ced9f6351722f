"""CPUs for the input pipeline: Train workers must not take every CPU that Ray Data needs.

Ray Data reads, crops and batches the training examples in tasks of their own; when the Train
workers hold every CPU of the cluster those tasks never start and training waits at 0 rows without
a word. The check runs on the driver before the trainer starts and fails with the numbers and the fix.

An elastic run (``num_workers: [min, max]``) is checked at its minimum, and while it runs
:func:`input_cpus_kept` keeps the input pipeline's CPUs out of what Ray Train may grow into, at the
start and at every resize.
"""

from __future__ import annotations

import contextlib
import threading
import uuid
from collections.abc import Iterator

from pipeline.config import ConfigError, ScalingSection

DATA_CPUS = 1.0  # what the input pipeline needs at the least: one read/transform task at a time


class ClusterTooSmall(ConfigError):
    """The cluster cannot hold the Train workers and the input pipeline together."""


def check_data_cpus(cluster_cpus: float, scaling: ScalingSection, data_cpus: float = DATA_CPUS) -> None:
    """Raise :class:`ClusterTooSmall` when the workers (an elastic run's fewest) would fit but leave the
    data pipeline fewer than ``data_cpus``. A cluster too small for them is left to Ray Train, which
    waits for the autoscaler to add nodes (and times out on a fixed cluster); local mode (no workers)
    reserves nothing."""
    workers = scaling.worker_range[0]
    train_cpus = workers * scaling.cpus_per_worker
    if workers == 0 or cluster_cpus < train_cpus or cluster_cpus - train_cpus >= data_cpus:
        return
    most = max(0, int((cluster_cpus - data_cpus) // scaling.cpus_per_worker))
    field = "scaling.num_workers (its min)" if scaling.elastic else "scaling.num_workers"
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


RESERVATION_TTL_S = 180.0  # a reservation a dead driver leaves behind lapses after this long
RESERVATION_RENEW_S = 20.0


@contextlib.contextmanager
def input_cpus_kept(scaling: ScalingSection, run_name: str, data_cpus: float = DATA_CPUS) -> Iterator[None]:
    """While an elastic run trains, keep ``data_cpus`` out of the CPUs Ray Train may size it to.

    Ray Train sizes an elastic worker group, at the start and at each resize, from what Ray's
    autoscaling coordinator (shared by Ray Train and Ray Data) reserves for it; requests of one
    priority are served in the order they were first made. A request made before the trainer's, at its
    priority, is therefore always served first, so the group never grows into the input pipeline's
    CPUs. A reservation is bookkeeping only: it holds no CPU, and Ray Data's tasks run on it. It is
    renewed while the run lasts and lapses on its own if the driver dies. Fixed-size runs need none.
    The coordinator is Ray's internal API (``ray.data._internal``), kept to this one function."""
    if not scaling.elastic:
        yield
        return
    import ray
    from ray.data._internal.cluster_autoscaler import ResourceRequestPriority, get_or_create_autoscaling_coordinator

    coordinator = get_or_create_autoscaling_coordinator()
    requester = f"ssamba-input-pipeline-{run_name}-{uuid.uuid4().hex[:8]}"

    def reserve() -> None:
        ray.get(coordinator.request_resources.remote(
            requester_id=requester, resources=[{"CPU": data_cpus}], expire_after_s=RESERVATION_TTL_S,
            priority=ResourceRequestPriority.HIGH), timeout=30)

    reserve()
    stop = threading.Event()

    def renew() -> None:
        while not stop.wait(RESERVATION_RENEW_S):
            with contextlib.suppress(Exception):  # a missed renewal is retried; the TTL spans several
                reserve()

    renewer = threading.Thread(target=renew, name="input-cpu-reservation", daemon=True)
    renewer.start()
    try:
        yield
    finally:
        stop.set()
        renewer.join()
        with contextlib.suppress(Exception):  # the reservation lapses on its own
            ray.get(coordinator.cancel_request.remote(requester), timeout=30)
