"""The typed config of ``python -m pipeline.tune``: which job a trial runs, the search space over that
job's config fields, the search algorithm and scheduler, and the resources of one trial.

The space names fields of the trial's job config by dotted path (``optim.lr``,
``masking.mask_patches``). Every value a dimension can take (grid and choice values, both ends of a
range) is applied to the base config and validated here, so a typo or an out-of-range bound fails
before any cluster work, naming ``search.space.<field>``.
"""

from __future__ import annotations

from typing import Any, Literal, TypeVar

from pydantic import BaseModel, Field, ValidationError, model_validator
from ray import tune

from pipeline.config import (
    ConfigError,
    FinetuneJobConfig,
    Place,
    PretrainJobConfig,
    RayConfig,
    S3Config,
    Strict,
    TrackingConfig,
    error_lines,
    flatten,
    read_yaml,
)
from pipeline.config.fields import set_fields

ModelT = TypeVar("ModelT", bound=BaseModel)
_KINDS = ("grid", "choice", "uniform", "loguniform", "randint")
_JOB_SECTIONS = ("pretrain", "probe", "finetune")


class Dimension(Strict):
    """One field's values: ``grid`` (every value in every sample), ``choice`` (one at random),
    ``uniform`` / ``loguniform`` ``[low, high]``, or ``randint`` ``[low, high)``. Exactly one."""

    grid: list[Any] | None = Field(None, min_length=1, description="every value, in every sample")
    choice: list[Any] | None = Field(None, min_length=1, description="one value at random per trial")
    uniform: tuple[float, float] | None = Field(None, description="[low, high], uniformly")
    loguniform: tuple[float, float] | None = Field(None, description="[low, high], uniformly in log scale")
    randint: tuple[int, int] | None = Field(None, description="an integer in [low, high)")

    @model_validator(mode="after")
    def _one_kind_with_valid_bounds(self) -> Dimension:
        given = [kind for kind in _KINDS if getattr(self, kind) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of {', '.join(_KINDS)}")
        bounds = self.uniform or self.loguniform or self.randint
        if bounds is not None and not bounds[0] < bounds[1]:
            raise ValueError(f"{given[0]}: low must be below high, got {list(bounds)}")
        if self.loguniform is not None and self.loguniform[0] <= 0:
            raise ValueError("loguniform: bounds must be positive")
        return self

    @property
    def kind(self) -> str:
        return next(kind for kind in _KINDS if getattr(self, kind) is not None)

    def domain(self) -> Any:
        """The Ray Tune search-space object."""
        values = getattr(self, self.kind)
        if self.kind == "grid":
            return tune.grid_search(list(values))
        if self.kind == "choice":
            return tune.choice(list(values))
        return {"uniform": tune.uniform, "loguniform": tune.loguniform, "randint": tune.randint}[self.kind](*values)

    def extremes(self) -> list[Any]:
        """The values to check against the job config: every listed value, or both range ends."""
        if self.kind == "randint":
            return [self.randint[0], self.randint[1] - 1]
        return list(getattr(self, self.kind))

    def describe(self) -> str:
        return f"{self.kind}{list(getattr(self, self.kind))}"


class SearchConfig(Strict):
    """How trials are drawn and stopped. ``num_samples`` counts random draws (with a grid: repeats of
    the whole grid). ASHA stops weak trials early on the metric they report as they train (every epoch
    of a fine-tuning sweep, every probe of a mask sweep whose pretraining probes itself); Optuna
    replaces random draws with a TPE search (ranges and choices only)."""

    space: dict[str, Dimension] = Field(..., min_length=1, description="the trial job's dotted field names "
                                        "(optim.lr) → their values")
    num_samples: int = Field(1, ge=1, description="random draws (with a grid: repeats of the whole grid)")
    algorithm: Literal["random", "optuna"] = Field("random", description="random (and grid) values, or Optuna's TPE")
    scheduler: Literal["fifo", "asha"] = Field("fifo", description="run every trial to the end, or stop weak "
                                               "ones early (ASHA)")
    grace_period: int = Field(1, ge=1, description="ASHA: what every trial runs before it can be stopped: epochs "
                              "(fine-tuning sweeps) or optimizer steps (mask sweeps)")
    reduction_factor: float = Field(2, gt=1, description="ASHA: keep 1/reduction_factor of the trials per rung")
    max_concurrent_trials: int | None = Field(None, ge=1, description="default: as many as the cluster's resources fit")
    seed: int | None = Field(None, description="seeds the draws")

    @model_validator(mode="after")
    def _optuna_has_no_grid(self) -> SearchConfig:
        if self.algorithm == "optuna" and any(d.grid is not None for d in self.space.values()):
            raise ValueError("search.algorithm optuna cannot search a grid: use choice")
        return self


class TrialResources(Strict):
    """What Tune reserves for one trial. Fine-tuning trials train inside the trial (give the GPU
    here); mask-sweep trials only drive a Ray Train run (``pretrain.scaling`` sizes it), so they
    default to a sliver of a CPU, or to no CPU when ``custom`` pins them to nodes that advertise a
    resource (the clusters in ``cluster/`` give their CPU-less head ``TRAIN_DRIVER``)."""

    cpu: float | None = Field(None, ge=0, description="default: 1 for fine-tuning trials, a sliver for mask trials")
    gpu: float = Field(0, ge=0, description="GPUs per trial")
    custom: dict[str, float] = Field({}, description="custom Ray resources per trial (node pinning)")

    @model_validator(mode="after")
    def _not_empty(self) -> TrialResources:
        if self.cpu == 0 and not self.gpu and not any(self.custom.values()):
            raise ValueError("a trial must reserve something: cpu, gpu or a custom resource")
        return self


class SweepTrackingConfig(TrackingConfig):
    experiment: str = Field("ssamba-tune", description="MLflow experiment name")


class TuneJobConfig(Strict):
    """``python -m pipeline.tune``: a mask sweep (each trial pretrains with its masking, scored by the
    probes inside its pretraining, ``pretrain.probe``, or by a linear probe after it, ``probe``) or a
    fine-tuning sweep (each trial fine-tunes with its recipe)."""

    name: str = Field(..., pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$",
                      description="the sweep's name: relaunching with it resumes the sweep")
    sweep: Literal["mask", "finetune"] = Field(..., description="what a trial runs: pretraining scored by a "
                                               "linear probe, or fine-tuning")
    storage_path: Place = Field(..., description="where Tune keeps the sweep's state (local folder or s3://)")
    storage: S3Config = S3Config()
    pretrain: PretrainJobConfig | None = Field(None, description="mask sweeps: the base pretraining run")
    probe: FinetuneJobConfig | None = Field(None, description="mask sweeps scored after pretraining: the linear "
                                            "probe that scores a trial (or give pretrain.probe: scored while it trains)")
    finetune: FinetuneJobConfig | None = Field(None, description="fine-tuning sweeps: the base fine-tuning run")
    search: SearchConfig
    resources: TrialResources = TrialResources()
    metric: str | None = Field(None, description="default: pretrain.probe's first metric (probe_knn_accuracy), "
                               "probe_<validation metric> (a probe after pretraining) or the validation metric")
    mode: Literal["max", "min"] = Field("max", description="whether a higher or a lower metric is better")
    max_failures: int = Field(0, ge=-1, description="restarts of a failed trial (from its last checkpoint)")
    tracking: SweepTrackingConfig = SweepTrackingConfig()
    ray: RayConfig = RayConfig()

    @model_validator(mode="before")
    @classmethod
    def _read_bases(cls, data: Any) -> Any:
        """``pretrain: {base: configs/pretrain/tiny.yaml, <changes>}``: a job preset with changes. The
        path is relative to the working directory, like ``--config`` (the repository root)."""
        if not isinstance(data, dict):
            return data
        data = dict(data)
        for section in _JOB_SECTIONS:
            value = data.get(section)
            if isinstance(value, dict) and "base" in value:
                changes = {key: item for key, item in value.items() if key != "base"}
                try:
                    data[section] = set_fields(read_yaml(value["base"]), flatten(changes))
                except ConfigError as error:
                    raise ValueError(f"{section}.base: {error}") from None
        return data

    @model_validator(mode="after")
    def _job_matches_sweep(self) -> TuneJobConfig:
        if self.sweep == "mask":
            self._mask_sweep_is_scored()
        else:
            if self.finetune is None:
                raise ValueError("a fine-tuning sweep needs finetune (the base run)")
            if self.pretrain is not None or self.probe is not None:
                raise ValueError("pretrain and probe belong to mask sweeps (sweep: mask)")
            if self.finetune.task == "esc50" and len(self.finetune.folds or []) != 1:
                raise ValueError("finetune.folds: a fine-tuning trial trains one cross-validation split; "
                                 "give exactly one test fold")
        for field, dimension in self.search.space.items():
            for value in dimension.extremes():
                try:
                    with_values(self.trial_base, {field: value})
                except ValueError as error:
                    raise ValueError(f"search.space.{field} = {value!r}: {error}") from None
        return self

    def _mask_sweep_is_scored(self) -> None:
        """A mask sweep is scored either by the probes inside each trial's pretraining (reported as it
        trains: ASHA and Optuna apply) or by one linear probe after it (scored once: neither applies)."""
        if self.pretrain is None:
            raise ValueError("a mask sweep needs pretrain (the base run)")
        if self.finetune is not None:
            raise ValueError("finetune belongs to fine-tuning sweeps (sweep: finetune)")
        in_loop = self.pretrain.probe is not None
        if in_loop == (self.probe is not None):
            raise ValueError("a mask sweep is scored by pretrain.probe (probes while each trial trains) or by probe "
                             "(a linear probe after it): give exactly one")
        if not in_loop:
            if self.search.scheduler != "fifo" or self.search.algorithm != "random":
                raise ValueError("a mask sweep scored after pretraining is scored once: use scheduler fifo and "
                                 "algorithm random, or probe inside pretraining (pretrain.probe) for ASHA or Optuna")
            return
        probe, train = self.pretrain.probe, self.pretrain.train
        if self.metric is not None and self.metric not in probe.metrics:
            raise ValueError(f"metric: {self.metric} is not reported by pretrain.probe (it reports "
                             f"{', '.join(probe.metrics)})")
        if train.checkpoint_every % probe.every:
            raise ValueError(f"pretrain.train.checkpoint_every ({train.checkpoint_every}) must be a multiple of "
                             f"pretrain.probe.every ({probe.every}): every report Tune ranks needs a probe score")

    @property
    def probes_in_loop(self) -> bool:
        """A mask sweep scored by the probes inside its trials' pretraining."""
        return self.sweep == "mask" and self.pretrain.probe is not None

    @property
    def trial_base(self) -> PretrainJobConfig | FinetuneJobConfig:
        """The config whose fields the search space sets."""
        return self.pretrain if self.sweep == "mask" else self.finetune


def with_values(config: ModelT, values: dict[str, Any]) -> ModelT:
    """``config`` with dotted fields replaced and validated again. Only what the config set is
    re-applied, so fields left at their defaults stay unset: a ratio replaces the default mask count
    (a count the config sets must be cleared: ``masking.mask_patches: null``)."""
    try:
        return type(config).model_validate(set_fields(config.model_dump(exclude_unset=True), values))
    except ValidationError as error:
        raise ValueError("; ".join(error_lines(error))) from None
