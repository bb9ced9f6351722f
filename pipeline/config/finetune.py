"""The config of ``pipeline.finetune``: the task, the encoder it starts from, the recipe."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from pipeline.config.base import TEST_ONLY, Place, Strict, one_of
from pipeline.config.sections import ENCODER_DEFAULTS as _ENCODER
from pipeline.config.sections import (
    TASK_DESCRIPTION,
    AugmentConfig,
    RayConfig,
    ScalingSection,
    TaskName,
    TrackingConfig,
)
from pipeline.data.storage import S3Config
from ssamba import EMBED_DIMS, NORM_PRESETS


class FinetuneFaultInjectionConfig(Strict):
    """Switches for tests only."""

    fail_at_epoch: int | None = Field(None, ge=1, description="raise when this epoch (from 1) starts, unless resumed")


class FinetuneModelConfig(Strict):
    """Where the encoder comes from and how it is used: our checkpoint, an official SSAMBA ``.pth``, or
    random init (``checkpoint: ""``, with ``size``); patch stride 10 as in the recipes; mean or [CLS]
    pooling; ``freeze_encoder`` for a linear probe."""

    checkpoint: Place = Field("", description="our checkpoint or an official .pth (local or s3://); empty = random init")
    size: one_of(EMBED_DIMS) = Field("tiny", description="random init only: the named size")
    stride: int = Field(10, ge=1, le=_ENCODER.grid.fshape,
                        description=f"patch stride in both axes (patches overlap below {_ENCODER.grid.fshape})")
    pooling: Literal["mean", "cls"] = Field("mean", description="mean of the patch tokens, or the [CLS] token")
    freeze_encoder: bool = Field(False, description="train the head only (a linear probe)")


class FinetuneAugmentConfig(AugmentConfig):
    """Per-example augmentation (SpecAugment, noise) plus mixup, which needs the batch: with probability
    ``mixup`` an example is mixed with another of its batch, λ ~ Beta(10, 10), targets alike (as the
    official recipes, but on stored features rather than waveforms)."""

    mixup: float = Field(0.0, ge=0, le=1, description="probability that a training example is mixed")

    def per_example(self) -> AugmentConfig:
        """The part the input pipeline applies to each example."""
        return AugmentConfig(**self.model_dump(exclude={"mixup"}))


class FinetuneOptimConfig(Strict):
    """Adam with a separate head learning rate and the recipes' per-epoch step decay."""

    lr: float = Field(1e-4, gt=0, description="the encoder's learning rate")
    head_lr_multiplier: float = Field(1.0, gt=0, description="the head's rate = lr × this")
    weight_decay: float = Field(5e-7, ge=0, description="Adam weight decay")
    betas: tuple[float, float] = Field((0.95, 0.999), description="Adam betas")
    decay_start_epoch: int = Field(5, ge=0, description="epochs trained at the full rate before the decay starts")
    decay_every: int = Field(1, ge=1, description="epochs between decays")
    decay: float = Field(0.85, gt=0, le=1, description="factor per decay")
    grad_clip: float | None = Field(None, gt=0, description="clip the global gradient norm (off in the recipes)")


class FinetuneScalingSection(ScalingSection):
    """Fine-tuning selects its best epoch from the checkpoints Ray Train keeps in storage, which its
    local mode (no workers) does not keep: at least one worker."""

    num_workers: int = Field(1, ge=1, description="Ray Train workers (at least 1: the selected epoch is read back "
                             "from the checkpoints they leave in storage)")


class FinetuneTrackingConfig(TrackingConfig):
    experiment: str = Field("ssamba-finetune", description="MLflow experiment name")


class FinetuneJobConfig(Strict):
    """``python -m pipeline.finetune``: fine-tune (or linearly probe) an encoder on a labelled task."""

    name: str = Field(..., pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$",
                      description="deterministic run name: relaunching with it resumes the run")
    storage_path: Place = Field(..., description="checkpoint root (local folder or s3://bucket/prefix)")
    storage: S3Config = S3Config()
    task: TaskName = Field(..., description=TASK_DESCRIPTION)
    data_root: Place = Field(..., description="the dataset folder, or the manifest for task=manifest")
    features: Place = Field(..., description="where the task's audio is featurized (reused when present)")
    folds: list[int] | None = Field(None, description="ESC-50-style cross-validation: the test folds to run")
    target_length: int = Field(512, ge=16, description="frames per clip: the features and the model's input")
    norm: one_of(NORM_PRESETS) = Field("audioset", description="normalisation statistics (mean, std) of a dataset")
    augment: FinetuneAugmentConfig = FinetuneAugmentConfig()
    loss: Literal["ce", "bce"] = Field("ce", description="softmax cross-entropy, or per-class binary cross-entropy "
                                       "over one-/multi-hot targets (the Speech Commands and AS-20K recipes)")
    model: FinetuneModelConfig = FinetuneModelConfig()
    optim: FinetuneOptimConfig = FinetuneOptimConfig()
    batch_size: int = Field(48, ge=1, description="per worker and micro-step")
    grad_accum: int = Field(1, ge=1, description="micro-steps per optimizer step (a larger batch in the same memory)")
    precision: Literal["bf16", "fp32"] = Field("bf16", description="bf16 autocast on GPUs, or full fp32 (the CPU "
                                               "computes in fp32 either way)")
    seed: int = Field(0, description="seeds the head's initialisation and the mixup draws")
    shuffle_buffer: int = Field(256, ge=0, description="training rows mixed across shards each epoch (0: none)")
    epochs: int = Field(50, ge=1, description="passes over the training split")
    scaling: FinetuneScalingSection = FinetuneScalingSection()
    tracking: FinetuneTrackingConfig = FinetuneTrackingConfig()
    ray: RayConfig = RayConfig()
    testing: FinetuneFaultInjectionConfig = Field(FinetuneFaultInjectionConfig(), json_schema_extra=TEST_ONLY,
                                                  description="fault injection for the tests")
