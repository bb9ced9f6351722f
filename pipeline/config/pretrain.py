"""The config of ``pipeline.pretrain``: the encoder, masking, optimizer, loop, elastic scaling."""

from __future__ import annotations

import math
from typing import Annotated, Any, Callable, Literal

from pydantic import Field, model_validator

from pipeline.config.base import TEST_ONLY, Place, Strict, one_of
from pipeline.config.sections import ENCODER_DEFAULTS as _ENCODER
from pipeline.config.sections import (
    MULTI_LABEL_TASKS,
    TASK_DESCRIPTION,
    ExamplesConfig,
    RayConfig,
    ScalingSection,
    TaskName,
    TrackingConfig,
)
from pipeline.data.storage import S3Config
from ssamba import (
    EMBED_DIMS,
    VALIDATION_MASK_COUNT,
    EncoderConfig,
    Norm,
    PatchGrid,
    PretrainConfig,
    TargetNorm,
    TeacherStudentConfig,
    Topology,
)
from ssamba.probes import DEFAULT_POOLING, POOLINGS

_MASKING = PretrainConfig()


class ModelConfig(Strict):
    """The SSAMBA encoder: a named size (D = 192/384/768) or an explicit width, official topology.
    Sizes, norms, topologies and defaults are the model library's."""

    size: one_of(EMBED_DIMS) = Field("tiny", description="named width: " + ", ".join(
        f"{name} {dim}" for name, dim in EMBED_DIMS.items()))
    embed_dim: int | None = Field(None, ge=8, description="overrides the size's width (small experiments)")
    depth: int = Field(_ENCODER.depth, ge=2, description="Mamba blocks (even for flip_pairs)")
    num_mel_bins: int = Field(_ENCODER.grid.num_mel_bins, ge=16, description="mel bins of the input features")
    target_length: int = Field(_ENCODER.grid.target_length, ge=16, description="frames of the input features")
    patch: int = Field(_ENCODER.grid.fshape, ge=2, description="square patch size = stride in pretraining")
    topology: Topology = Field(_ENCODER.topology, description="flip_pairs: the official pairs of forward and "
                               "reversed blocks; sequential: a plain stack")
    norm: Norm = Field(_ENCODER.norm, description="the blocks' normalisation")
    drop_path_rate: float = Field(_ENCODER.drop_path_rate, ge=0, lt=1, description="stochastic depth of the last block")

    def encoder_config(self) -> EncoderConfig:
        """The library's encoder config; ``ValueError`` if the library rejects the combination."""
        grid = PatchGrid(self.num_mel_bins, self.target_length, self.patch, self.patch, self.patch, self.patch)
        width = {} if self.embed_dim is None else {"embed_dim": self.embed_dim}
        return EncoderConfig.from_size(self.size, depth=self.depth, grid=grid, drop_path_rate=self.drop_path_rate,
                                       norm=self.norm, topology=self.topology, **width)


_TEACHER_STUDENT = TeacherStudentConfig()


class ObjectiveConfig(Strict):
    """What pretraining optimises. ``masked_patches``: the paper's (SSAST's) masked-patch InfoNCE + MSE,
    configured by ``masking``, what official checkpoints were trained with. ``teacher_student``: an EMA
    teacher encodes the whole clip once, a student encodes only the visible patches of ``clones`` masks
    and regresses the teacher's averaged top-block outputs at the masked ones (fewer tokens per clip)."""

    kind: Literal["masked_patches", "teacher_student"] = Field("masked_patches", description="the objective")
    clones: int = Field(_TEACHER_STUDENT.clones, ge=1, description="teacher_student: masks per clip sharing one "
                        "teacher pass")
    mask_ratio: float = Field(_TEACHER_STUDENT.mask_ratio, gt=0, lt=1, description="teacher_student: fraction of the "
                              "patches the student does not see")
    block_size: int = Field(_TEACHER_STUDENT.block_size, ge=1, description="teacher_student: side of the square "
                            "blocks of visible patches (inverse block masking)")
    top_k_blocks: int = Field(_TEACHER_STUDENT.top_k_blocks, ge=1, description="teacher_student: the teacher's last "
                              "stages averaged into the target")
    ema_decay_start: float = Field(_TEACHER_STUDENT.ema_decay_start, ge=0, le=1, description="teacher_student: "
                                   "the teacher's EMA decay at step 0")
    ema_decay_end: float = Field(_TEACHER_STUDENT.ema_decay_end, ge=0, le=1, description="teacher_student: the "
                                 "decay after ema_anneal_steps (linear in between)")
    ema_anneal_steps: int = Field(_TEACHER_STUDENT.ema_anneal_steps, ge=0, description="teacher_student: steps "
                                  "from ema_decay_start to ema_decay_end")
    decoder_dim: int = Field(_TEACHER_STUDENT.decoder_dim, ge=16, description="teacher_student: width of the light "
                             "decoder (a multiple of 16)")
    decoder_depth: int = Field(_TEACHER_STUDENT.decoder_depth, ge=1, description="teacher_student: decoder layers")
    utterance_weight: float = Field(_TEACHER_STUDENT.utterance_weight, ge=0, description="teacher_student: weight "
                                    "of the utterance-level loss on the [CLS] token")
    target_norm: TargetNorm = Field(_TEACHER_STUDENT.target_norm, description="teacher_student: how each teacher "
                                    "stage is normalised before the average: instance (per feature over the clip, "
                                    "EAT's) or layer (per patch, keeps what the clip's patches share)")
    reconstruction_weight: float = Field(_TEACHER_STUDENT.reconstruction_weight, ge=0, description="teacher_student: "
                                         "weight of an added MSE reconstruction of the masked fbank patches (0: off)")

    @property
    def teacher_student(self) -> bool:
        return self.kind == "teacher_student"

    def teacher_student_config(self) -> TeacherStudentConfig:
        """The library's config (raises ``ValueError`` on an invalid combination)."""
        return TeacherStudentConfig(**self.model_dump(exclude={"kind"}))

    @model_validator(mode="after")
    def _library_accepts(self) -> ObjectiveConfig:
        self.teacher_student_config()
        return self


class MaskingConfig(Strict):
    """Masked patches per clip (count or ratio), the official two passes or one, and the fixed
    validation count (400 of 512 officially; capped to the grid for small models). The model
    library checks the counts (:class:`ssamba.PretrainConfig`)."""

    mask_patches: int | None = Field(_MASKING.mask_patches, description="masked patches per clip (or give mask_ratio)")
    mask_ratio: float | None = Field(None, description="fraction of the patches masked per clip, in (0, 1)")
    two_pass: bool = Field(_MASKING.two_pass, description="separate masked passes for the discriminative and "
                           "generative objectives (official); false: one pass feeds both")
    validation_mask_patches: int = Field(VALIDATION_MASK_COUNT, ge=1, description="masked patches per validation clip")

    @model_validator(mode="before")
    @classmethod
    def _ratio_replaces_count(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("mask_ratio") is not None and "mask_patches" not in data:
            data = {**data, "mask_patches": None}
        return data

    @model_validator(mode="after")
    def _library_accepts(self) -> MaskingConfig:
        self.pretrain_config()
        return self

    def pretrain_config(self) -> PretrainConfig:
        """The library's pretraining config (raises ``ValueError`` on an invalid choice)."""
        return PretrainConfig(mask_patches=self.mask_patches, mask_ratio=self.mask_ratio, two_pass=self.two_pass)


class OptimConfig(Strict):
    """AdamW with linear warm-up, then the official plateau schedule on validation accuracy, cosine
    decay, or a constant rate (the paper's recipe by default)."""

    lr: float = Field(1e-4, gt=0, description="peak learning rate")
    weight_decay: float = Field(5e-8, ge=0, description="AdamW weight decay")
    betas: tuple[float, float] = Field((0.95, 0.999), description="AdamW betas")
    warmup_steps: int = Field(1000, ge=0, description="linear warm-up from 0 to lr")
    schedule: Literal["plateau", "cosine", "constant"] = Field("plateau", description="after warm-up: halve on a "
                                                               "validation plateau, cosine to 0, or constant")
    plateau_factor: float = Field(0.5, gt=0, lt=1, description="plateau: factor applied to the rate")
    plateau_patience: int = Field(2, ge=0, description="evaluations without improvement before decaying")
    grad_clip: float | None = Field(None, gt=0, description="clip the global gradient norm (off officially)")


ProbeMethod = Literal["knn", "linear"]


class ProbeConfig(Strict):
    """Downstream probes inside the pretraining loop: every ``every`` steps (and at the last) the frozen
    encoder embeds a fixed, seeded subset of a labelled task (no masking, ``pooling``), and a weighted k-NN
    vote and a logistic regression fitted on its training clips score its held-out clips. The scores
    (``probe_knn_accuracy``, ``probe_linear_accuracy``; ``_mAP`` for multi-label tasks) compare across
    mask ratios and objectives, which the masked losses do not."""

    task: TaskName = Field("folders", description=TASK_DESCRIPTION)
    data_root: Place = Field(..., description="the dataset folder, or the manifest for task=manifest")
    features: Place = Field(..., description="where the task's audio is featurized (reused when present)")
    every: int = Field(500, ge=1, description="optimizer steps between probes (and at the last step)")
    methods: tuple[ProbeMethod, ...] = Field(("knn", "linear"), min_length=1, description="knn (weighted vote) "
                                             "and/or linear (logistic regression)")
    max_clips: int = Field(2000, ge=2, description="clips probed (a fixed, seeded subset of the task's training "
                           "and held-out clips, so every probe costs the same)")
    pooling: one_of(POOLINGS) = Field(DEFAULT_POOLING, description="how a clip's patch tokens become one vector: "
                                      "bands (each band's mean over time), mean (every patch) or both")
    k: int = Field(20, ge=1, description="knn: neighbours that vote")
    temperature: float = Field(0.07, gt=0, description="knn: a neighbour's vote is exp(cosine similarity / "
                               "temperature)")
    weight_decay: float = Field(1e-3, ge=0, description="linear: L2 penalty on the weights (mean loss + "
                                "weight_decay x |W|^2)")
    batch_size: int = Field(32, ge=1, description="clips per forward pass while embedding")
    seed: int = Field(0, description="chooses the subset")

    @model_validator(mode="after")
    def _distinct_methods(self) -> ProbeConfig:
        if len(set(self.methods)) != len(self.methods):
            raise ValueError(f"methods: each method once, got {list(self.methods)}")
        return self

    @property
    def multi_label(self) -> bool:
        return self.task in MULTI_LABEL_TASKS

    def metric(self, method: str) -> str:
        """The MLflow metric of a method: ``probe_<method>_accuracy``, or ``_mAP`` for multi-label tasks."""
        return f"probe_{method}_{'mAP' if self.multi_label else 'accuracy'}"

    @property
    def metrics(self) -> list[str]:
        return [self.metric(method) for method in self.methods]


SELECTIONS = ("last", *(f"probe_{method}_{score}" for method in ("knn", "linear") for score in ("accuracy", "mAP")))


class TrainLoopConfig(Strict):
    """Steps, batches, and how often the loop evaluates, checkpoints, logs and draws."""

    batch_size: int = Field(64, ge=1, description="per worker and micro-step")
    grad_accum: int = Field(1, ge=1, description="micro-steps per optimizer step on the most workers (an elastic "
                            "run on fewer accumulates more; see global_batch_size)")
    global_batch_size: int | None = Field(None, ge=1, description="examples per optimizer step over all workers, "
                                          "held when an elastic run changes size (accumulation adapts); "
                                          "default: batch_size x most workers x grad_accum")
    max_steps: int = Field(..., ge=1, description="optimizer steps in all (the run resumes up to it)")
    eval_every: int = Field(4000, ge=1, description="steps between validations")
    eval_batches: int | None = Field(None, ge=1, description="cap on validation batches per evaluation")
    checkpoint_every: int = Field(4000, ge=1, description="steps between checkpoints")
    keep_checkpoints: int = Field(3, ge=1, description="newest checkpoints kept")
    log_every: int = Field(50, ge=1, description="steps between logged metrics")
    figure_every: int = Field(4000, ge=1, description="steps between reconstruction figures")
    precision: Literal["bf16", "fp32"] = Field("bf16", description="bf16 autocast, or full fp32")
    seed: int = Field(0, description="seeds initialisation, masks and data order")
    select_by: one_of(SELECTIONS) = Field("last", description="the exported encoder: the last step's, or the "
                                          "step with the best score of this probe metric (needs probe)")


WorkerCount = Annotated[int, Field(ge=0)]


class ElasticScalingSection(ScalingSection):
    """Ray Train workers for pretraining: a fixed number, or ``[min, max]`` for an elastic run that
    starts with the workers the cluster has room for (at least ``min``), grows as nodes join and
    shrinks as they leave, each time resuming from the last checkpoint (Ray Train's elastic training).
    The global batch stays the same: gradient accumulation adapts to the number of workers."""

    num_workers: WorkerCount | tuple[WorkerCount, WorkerCount] = Field(
        1, description="Ray Train workers (0: run in the driver), or [min, max] for an elastic run")
    resize_interval_s: float = Field(60.0, gt=0, description="elastic runs: seconds between Ray Train's looks at "
                                     "the cluster for room to grow (a lost node restarts the run at once)")

    @model_validator(mode="after")
    def _ordered_range(self) -> ElasticScalingSection:
        low, high = self.worker_range
        if self.elastic and not 1 <= low <= high:
            raise ValueError(f"num_workers: [min, max] needs 1 <= min <= max, got [{low}, {high}]")
        return self

    def ray_scaling(self) -> dict[str, Any]:
        if not self.elastic:
            return super().ray_scaling()
        return {**super().ray_scaling(), "num_workers": self.worker_range,
                "elastic_resize_monitor_interval_s": self.resize_interval_s}


class FaultInjectionConfig(Strict):
    """Switches for tests only."""

    fail_at_step: int | None = Field(None, ge=1, description="raise in the last worker at this step, first attempt only")
    hold_at_step: int | None = Field(None, ge=1, description="every worker of the first attempt waits after this "
                                     "step (and its checkpoint) until Ray Train replaces the worker group")
    hold_s: float = Field(300.0, gt=0, description="hold_at_step: fail if the worker group is not replaced in time")


_TARGET_LENGTH_SECTIONS = ("data", "validation", "model")


class PretrainJobConfig(Strict):
    """``python -m pipeline.pretrain``: masked-patch pretraining on Ray Train, tracked in MLflow."""

    name: str = Field(..., pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$",
                      description="deterministic run name: relaunching with it resumes the run")
    storage_path: Place = Field(..., description="checkpoint root (local folder or s3://bucket/prefix)")
    storage: S3Config = S3Config()
    target_length: int = Field(_ENCODER.grid.target_length, ge=16,
                               description="frames per clip: data, validation and model use it unless they set their own")
    data: ExamplesConfig = Field(..., description="training examples")
    validation: ExamplesConfig | None = Field(None, description="validation examples (masked-patch accuracy and MSE)")
    probe: ProbeConfig | None = Field(None, description="downstream probes of the encoder during training (off "
                                      "when absent)")
    model: ModelConfig = ModelConfig()
    objective: ObjectiveConfig = ObjectiveConfig()
    masking: MaskingConfig = MaskingConfig()
    optim: OptimConfig = OptimConfig()
    train: TrainLoopConfig
    scaling: ElasticScalingSection = ElasticScalingSection()
    tracking: TrackingConfig = TrackingConfig()
    ray: RayConfig = RayConfig()
    testing: FaultInjectionConfig = Field(FaultInjectionConfig(), json_schema_extra=TEST_ONLY,
                                          description="fault injection for the tests")

    @model_validator(mode="wrap")
    @classmethod
    def _one_target_length(cls, data: Any, handler: Callable[[Any], PretrainJobConfig]) -> PretrainJobConfig:
        """Sections that do not set ``target_length`` take the job's. The value they take stays
        marked unset, so that a sweep trial (which re-applies what was set) that changes the job's
        ``target_length`` changes theirs too."""
        if not isinstance(data, dict):
            return handler(data)
        length = data.get("target_length", cls.model_fields["target_length"].default)
        data, inherited = dict(data), []
        for name in _TARGET_LENGTH_SECTIONS:
            section = {} if name == "model" and data.get(name) is None else data.get(name)
            if isinstance(section, dict) and "target_length" not in section:
                data[name] = {**section, "target_length": length}
                inherited.append(name)
        config = handler(data)
        for name in inherited:
            getattr(config, name).model_fields_set.discard("target_length")
        if config.train.global_batch_size is None:  # derived, and unset: a sweep trial derives it anew
            object.__setattr__(config.train, "global_batch_size", config.default_global_batch_size)
            config.train.model_fields_set.discard("global_batch_size")
        return config

    @model_validator(mode="after")
    def _consistent(self) -> PretrainJobConfig:
        for name in ("data", "validation"):
            section = getattr(self, name)
            if section is not None and section.target_length != self.model.target_length:
                raise ValueError(f"{name}.target_length ({section.target_length}) must equal model.target_length "
                                 f"({self.model.target_length}): set target_length alone to change all three")
        try:
            grid = self.model.encoder_config().grid
        except ValueError as error:
            raise ValueError(f"model: {error}") from None
        if self.objective.teacher_student:
            if not 0 < self.objective.teacher_student_config().num_visible(grid.num_patches) < grid.num_patches:
                raise ValueError(f"objective.mask_ratio: {self.objective.mask_ratio} of {grid.num_patches} patches "
                                 "leaves the student nothing to see or nothing to predict")
        else:
            try:
                self.masking.pretrain_config().num_masked(grid.num_patches)
            except ValueError as error:
                given = "mask_patches" if self.masking.mask_patches is not None else "mask_ratio"
                raise ValueError(f"masking.{given}: {error}") from None
        self._selection_is_probed()
        if self.scaling.num_workers == 0 and self.scaling.max_failures:
            raise ValueError("scaling.max_failures needs Ray Train workers (num_workers ≥ 1); local mode cannot restart")
        self._global_batch_divides()
        return self

    def _selection_is_probed(self) -> None:
        selected = self.train.select_by
        if selected == "last":
            return
        if self.probe is None:
            raise ValueError(f"train.select_by: {selected} needs a probe section")
        if selected not in self.probe.metrics:
            raise ValueError(f"train.select_by: {selected} is not a metric of this probe (it logs "
                             f"{', '.join(self.probe.metrics)})")

    @property
    def world_sizes(self) -> range:
        """Every number of workers the run may train on (local mode trains on one)."""
        low, high = self.scaling.worker_range
        return range(max(1, low), max(1, high) + 1)

    @property
    def default_global_batch_size(self) -> int:
        return self.train.batch_size * self.world_sizes[-1] * self.train.grad_accum

    def _global_batch_divides(self) -> None:
        """The global batch must be whole micro-batches on every world size the run may have."""
        train, sizes = self.train, self.world_sizes
        given = train.global_batch_size if "global_batch_size" in train.model_fields_set else None
        if given is not None and "grad_accum" in train.model_fields_set and given != self.default_global_batch_size:
            raise ValueError(f"train.global_batch_size ({given}) and train.grad_accum ({train.grad_accum}) disagree "
                             f"(batch_size {train.batch_size} x {sizes[-1]} workers x grad_accum = "
                             f"{self.default_global_batch_size}): give one of them")
        total = self.default_global_batch_size if given is None else given
        uneven = [size for size in sizes if total % (train.batch_size * size)]
        if uneven:
            origin = "" if given is not None else " (batch_size x most workers x grad_accum)"
            step = train.batch_size * math.lcm(*sizes)
            raise ValueError(f"train.global_batch_size: {total}{origin} is not a whole number of micro-batches of "
                             f"train.batch_size {train.batch_size} on {uneven[0]} workers (scaling.num_workers "
                             f"{list(self.scaling.worker_range)}): use a multiple of {step}")
