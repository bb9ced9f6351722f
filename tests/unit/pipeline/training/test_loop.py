"""Pure parts of the training loops: schedules, clocks, batch sizes, the compute path, step metrics."""

from __future__ import annotations

import pytest
import torch

from pipeline.config import (
    FinetuneJobConfig,
    PretrainJobConfig,
    load_config,
)
from pipeline.finetune import StepDecay
from pipeline.pretrain import accumulation_steps, step_metrics
from pipeline.training.loop import Clock, base_rates, set_learning_rates
from ssamba import PretrainOutput, TeacherStudentOutput, ops


def test_learning_rate_warmup_plateau_and_cosine():
    from pipeline.pretrain import LearningRate

    config = load_config(PretrainJobConfig, "configs/pretrain/local-tiny.yaml",
                         ["optim.schedule=plateau", "optim.warmup_steps=10", "optim.lr=1.0", "optim.plateau_patience=1"])
    schedule = LearningRate(config)
    assert [schedule.factor(step) for step in (1, 5, 10, 50)] == pytest.approx([0.1, 0.5, 1.0, 1.0])
    for accuracy in (0.5, 0.4, 0.45):  # best, then two evaluations without improvement > patience 1
        schedule.observe(accuracy)
    assert schedule.factor(50) == pytest.approx(0.5)
    restored = LearningRate(config)
    restored.load_state_dict(schedule.state_dict())
    assert restored.factor(50) == pytest.approx(0.5)
    cosine = LearningRate(config.model_copy(update={"optim": config.optim.model_copy(update={"schedule": "cosine"})}))
    assert cosine.factor(10) == pytest.approx(1.0) and cosine.factor(config.train.max_steps) == pytest.approx(0.0, abs=1e-12)


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
