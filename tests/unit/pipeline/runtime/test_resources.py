"""The CPUs a job needs before it starts: Train workers leave CPUs for the input pipeline, sweeps run as
many trials as fit, elastic runs are checked at their minimum."""

from __future__ import annotations

import pytest

from pipeline.config import ElasticScalingSection, ScalingSection
from pipeline.runtime.resources import ClusterTooSmall, check_data_cpus, sweep_concurrency


def test_workers_leave_cpus_for_the_input_pipeline():
    def scaling(workers: int, cpus: float = 1) -> ScalingSection:
        return ScalingSection(num_workers=workers, cpus_per_worker=cpus)

    check_data_cpus(4, scaling(3))          # one CPU left for Ray Data
    check_data_cpus(4, scaling(0))          # local mode reserves nothing
    check_data_cpus(2, scaling(4))          # too small for the workers: Ray Train waits for nodes
    with pytest.raises(ClusterTooSmall) as error:
        check_data_cpus(4, scaling(4))
    message = str(error.value)
    assert "4 Train workers x 1 CPUs = 4 of the cluster's 4 CPUs leave 0" in message
    assert "scaling.num_workers (at most 3 here)" in message and "scaling.cpus_per_worker" in message
    with pytest.raises(ClusterTooSmall, match="at most 1 here"):
        check_data_cpus(15.5, scaling(2, 7.5))  # 0.5 CPU left


def test_sweeps_run_as_many_trials_as_hold_their_workers_and_input_pipelines():
    field = "search.max_concurrent_trials"
    assert sweep_concurrency(2, 1.0, 2, field) == 1     # a mask trial: its Train worker, plus its Ray Data
    assert sweep_concurrency(4, 1.0, 2, field) == 2
    assert sweep_concurrency(8, 1.0, None, field) == 4  # unbounded: what fits
    assert sweep_concurrency(8, 1.0, 1, field) == 1
    with pytest.raises(ClusterTooSmall, match="search.max_concurrent_trials: one trial needs 3 CPUs"):
        sweep_concurrency(2, 2.0, None, field)


def test_an_elastic_run_is_checked_at_its_minimum():
    """Its growth is held back at run time (``input_cpus_kept``, tested in tests/integration)."""
    def elastic(low: int, high: int, cpus: float = 1) -> ElasticScalingSection:
        return ElasticScalingSection(num_workers=(low, high), cpus_per_worker=cpus)

    check_data_cpus(2, elastic(1, 2))       # one worker, one CPU left for Ray Data
    check_data_cpus(4, elastic(1, 8))
    check_data_cpus(3, elastic(1, 2, 2))
    check_data_cpus(1, elastic(2, 4))       # too small for min: Ray Train waits for nodes
    with pytest.raises(ClusterTooSmall, match=r"2 Train workers .* scaling.num_workers \(its min\) \(at most 1"):
        check_data_cpus(2, elastic(2, 4))
