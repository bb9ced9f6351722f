"""Typed job configs, validated once at the edge (``pipeline.runtime.launch``), before any Ray work.

``base`` holds the machinery (strict sections, places, YAML + ``--set`` overrides, what is safe to
print), ``sections`` what several jobs share, and one module per job its own schema: ``jobs``
(featurize, embed), ``pretrain``, ``finetune`` and ``sweep`` (imported on its own: it needs Ray Tune).
"""

from pipeline.config.base import (
    ConfigError,
    Place,
    Strict,
    apply_overrides,
    error_lines,
    flatten,
    load_config,
    one_of,
    public_dict,
    read_yaml,
)
from pipeline.config.finetune import (
    FinetuneAugmentConfig,
    FinetuneFaultInjectionConfig,
    FinetuneJobConfig,
    FinetuneModelConfig,
    FinetuneOptimConfig,
    FinetuneTrackingConfig,
)
from pipeline.config.jobs import EmbedConfig, FeaturizeConfig
from pipeline.config.pretrain import (
    ElasticScalingSection,
    FaultInjectionConfig,
    MaskingConfig,
    ModelConfig,
    OptimConfig,
    PretrainJobConfig,
    ProbeConfig,
    TrainLoopConfig,
)
from pipeline.config.sections import (
    AUDIO_EXTENSIONS,
    AudioConfig,
    AugmentConfig,
    ExamplesConfig,
    InputConfig,
    RayConfig,
    ScalingSection,
    TrackingConfig,
)
from pipeline.data.storage import S3Config

__all__ = [
    "AUDIO_EXTENSIONS", "AudioConfig", "AugmentConfig", "ConfigError", "ElasticScalingSection", "EmbedConfig",
    "ExamplesConfig", "FaultInjectionConfig", "FeaturizeConfig", "FinetuneAugmentConfig", "FinetuneFaultInjectionConfig",
    "FinetuneJobConfig", "FinetuneModelConfig", "FinetuneOptimConfig", "FinetuneTrackingConfig", "InputConfig",
    "MaskingConfig", "ModelConfig", "OptimConfig", "Place", "PretrainJobConfig", "ProbeConfig", "RayConfig", "S3Config",
    "ScalingSection", "Strict", "TrackingConfig", "TrainLoopConfig", "apply_overrides", "error_lines", "flatten",
    "load_config", "one_of", "public_dict", "read_yaml",
]
