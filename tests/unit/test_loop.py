"""The shared loop helpers and run lifecycle without Ray: how a run's MLflow status follows the block
that drives it, the progress clock, the compute-path description, the schedules' factors."""

from __future__ import annotations

import os
import signal
import sys
import threading

import pytest
import torch

from pipeline.config import FinetuneJobConfig, PretrainJobConfig, load_config
from pipeline.finetune import StepDecay
from pipeline.training.loop import Clock, base_rates, set_learning_rates
from pipeline.pretrain import accumulation_steps, step_metrics
from pipeline.runtime.tracking import RunTracker, run_status
from ssamba import PretrainOutput, TeacherStudentOutput, ops


def _tracker(tmp_path, name: str) -> RunTracker:
    return RunTracker(f"sqlite:///{tmp_path / 'mlflow.db'}", "lifecycle", name)


def _status(tracker: RunTracker) -> str:
    return tracker.client.get_run(tracker.run_id).info.status


def _exit_inside_run_status(tracker: RunTracker, exits: list[BaseException]) -> None:
    try:
        with run_status(tracker):
            sys.exit(0)
    except BaseException as exiting:
        exits.append(exiting)


def test_run_status_follows_how_the_block_ends(tmp_path):
    finished = _tracker(tmp_path, "finished")
    with run_status(finished):
        assert _status(finished) == "RUNNING"
    assert _status(finished) == "FINISHED"

    failed = _tracker(tmp_path, "failed")
    with pytest.raises(ValueError), run_status(failed):
        raise ValueError("boom")
    assert _status(failed) == "FAILED"

    killed = _tracker(tmp_path, "killed")
    with pytest.raises(KeyboardInterrupt), run_status(killed):
        raise KeyboardInterrupt
    assert _status(killed) == "KILLED"

    terminated = _tracker(tmp_path, "terminated")
    handler_before = signal.getsignal(signal.SIGTERM)  # SIG_DFL, or Ray's own once an earlier test started Ray
    with pytest.raises(KeyboardInterrupt), run_status(terminated):
        os.kill(os.getpid(), signal.SIGTERM)
    assert _status(terminated) == "KILLED"
    assert signal.getsignal(signal.SIGTERM) is handler_before  # the block's handler is gone with the block

    aborted = _tracker(tmp_path, "aborted")  # Ray Train's Ctrl-C handler exits with status 0
    with pytest.raises(KeyboardInterrupt), run_status(aborted):
        raise SystemExit(0)
    assert _status(aborted) == "KILLED"

    stopped = _tracker(tmp_path, "stopped")  # Tune stops a trial's thread with sys.exit(0) at its next report
    exits: list[BaseException] = []
    trial_thread = threading.Thread(target=_exit_inside_run_status, args=(stopped, exits))
    trial_thread.start()
    trial_thread.join()
    assert [type(e) for e in exits] == [SystemExit] and _status(stopped) == "RUNNING"  # the sweep closes it

    decided = _tracker(tmp_path, "decided")
    with run_status(decided) as outcome:
        outcome.status = "FAILED"
    assert _status(decided) == "FAILED"

    reopened = _tracker(tmp_path, "killed")  # a relaunch resumes the run by name
    assert reopened.run_id == killed.run_id and _status(reopened) == "RUNNING"


def test_attached_tracker_logs_params_once(tmp_path):
    tracker = _tracker(tmp_path, "params")
    worker_side = RunTracker.attach(f"sqlite:///{tmp_path / 'mlflow.db'}", tracker.run_id)
    assert not worker_side.has_params()
    worker_side.log_params({"a": 1})
    assert worker_side.has_params() and _status(worker_side) == "RUNNING"


def test_clock_estimates_the_rest_from_this_launch(monkeypatch):
    now = [100.0]
    monkeypatch.setattr("pipeline.training.loop.time.perf_counter", lambda: now[0])
    clock = Clock(start=20, total=120)  # a resumed launch: 20 steps were done before
    now[0] = 110.0  # 10 s for 10 steps
    assert clock.timing(30) == "elapsed 0:00:10 | ETA 0:01:30"


def test_compute_path_names_the_cpu_operators_as_dispatched():
    assert ops.compute_path(torch.device("cpu")) == "selective_scan: fused CPU (numba), causal_conv1d: pure PyTorch"
    ops.force_pure_ops(True)
    try:
        assert ops.compute_path("cpu") == "selective_scan: pure PyTorch (forced), causal_conv1d: pure PyTorch (forced)"
    finally:
        ops.force_pure_ops(False)


def test_schedules_scale_each_group_from_its_base_rate():
    config = load_config(FinetuneJobConfig, "configs/finetune/esc50.yaml",
                         ["optim.decay=0.5", "optim.decay_start_epoch=2", "optim.decay_every=2"])
    decay = StepDecay(config.optim)
    assert [decay.factor(epoch) for epoch in range(1, 7)] == [1, 1, 0.5, 0.5, 0.25, 0.25]
    optimizer = torch.optim.Adam([{"params": [torch.zeros(1, requires_grad=True)], "lr": 1.0},
                                  {"params": [torch.zeros(1, requires_grad=True)], "lr": 0.1}])
    rates = base_rates(optimizer)
    set_learning_rates(optimizer, rates, decay.factor(5))
    assert [group["lr"] for group in optimizer.param_groups] == pytest.approx([0.25, 0.025])


def test_global_batch_counts_workers_and_accumulation():
    config = load_config(PretrainJobConfig, "configs/pretrain/local-tiny.yaml",
                         ["train.grad_accum=2", "train.batch_size=4", "scaling.num_workers=3"])
    assert config.train.global_batch_size == 24 and accumulation_steps(config, world_size=3) == 2


def test_step_metrics_are_the_objectives_terms_without_the_ones_left_out():
    value = torch.tensor
    plain = TeacherStudentOutput(value(1.5), value(1.0), value(0.5), None, value(0.9), value(0.8))
    assert step_metrics(plain) == {"loss": 1.5, "frame_mse": 1.0, "utterance_mse": 0.5,
                                   "target_std": pytest.approx(0.9), "prediction_std": pytest.approx(0.8)}
    hybrid = TeacherStudentOutput(value(2.0), value(1.0), value(0.5), value(1.0), value(0.9), value(0.8))
    assert step_metrics(hybrid)["reconstruction_mse"] == 1.0
    masked = PretrainOutput(value(3.0), value(2.0), value(0.1), value(0.25))
    assert step_metrics(masked) == {"loss": 3.0, "nce": 2.0, "mse": pytest.approx(0.1), "masked_accuracy": 0.25}
