"""Faults on purpose, for the fault-tolerance tests: the config's ``testing`` section (empty by default)
makes a worker raise at a known step or epoch, or the worker group wait at a step until the test has
changed the cluster. The training loops call one function here per step or epoch and know nothing else
of it."""

from __future__ import annotations

import time

from pipeline.config.finetune import FinetuneFaultInjectionConfig
from pipeline.config.pretrain import FaultInjectionConfig
from pipeline.training.loop import say
from pipeline.training.trainer import Worker


def after_step(settings: FaultInjectionConfig, step: int, restored: bool, worker: Worker) -> None:
    """After a pretraining step and its reports, on the first attempt only (a restored run trains on):
    ``fail_at_step`` raises in the last worker; ``hold_at_step`` keeps every worker here until Ray Train
    replaces the worker group (an elastic resize or a restart after a lost node ends this process), and
    raises if that does not happen within ``hold_s``."""
    if restored:
        return
    if settings.fail_at_step == step and worker.rank == worker.world_size - 1:
        raise RuntimeError(f"injected failure at step {step} (testing.fail_at_step)")
    if settings.hold_at_step == step:
        if worker.rank == 0:
            say(f"holding at step {step} until the worker group is replaced (testing.hold_at_step)")
        time.sleep(settings.hold_s)
        raise RuntimeError(f"testing.hold_at_step: the worker group was not replaced within {settings.hold_s:g} s")


def before_epoch(settings: FinetuneFaultInjectionConfig, epoch: int, restored: bool) -> None:
    """``fail_at_epoch``: raise as that fine-tuning epoch starts, on the first attempt only."""
    if settings.fail_at_epoch == epoch and not restored:
        raise RuntimeError(f"injected failure at epoch {epoch} (testing.fail_at_epoch)")
