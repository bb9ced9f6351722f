"""SSAMBA: self-supervised audio representation learning with a bidirectional Mamba encoder.

Pure PyTorch; this package never imports Ray, MLflow or boto3. The public API:
"""

from ssamba.checkpoint import Checkpoint, OfficialImport, import_official_checkpoint, load_checkpoint, save_checkpoint
from ssamba.classifier import Classifier, FeatureSettings, load_classifier, save_classifier
from ssamba.encoder import EMBED_DIMS, NORMS, TOPOLOGIES, EncoderConfig, Norm, PatchGrid, SSAMBAEncoder, Topology
from ssamba.features import FbankConfig, NORM_PRESETS, crop_or_pad, fbank, normalize, norm_stats, waveform_to_fbank
from ssamba.finetune import AudioClassifier, ClassifierConfig, adapt_encoder_state, adapt_pos_embed
from ssamba.pretrain import VALIDATION_MASK_COUNT, PretrainConfig, PretrainOutput, SSAMBAPretrainModel
from ssamba.pretrained import from_pretrained
from ssamba.ssast import SSASTConfig, SSASTEncoder
from ssamba.teacher_student import (
    TARGET_NORMS, SSAMBATeacherStudentModel, TargetNorm, TeacherStudentConfig, TeacherStudentOutput, TokenCount,
    tokens_per_clip,
)

__all__ = [
    "EMBED_DIMS",
    "NORMS",
    "TARGET_NORMS",
    "TOPOLOGIES",
    "AudioClassifier",
    "Checkpoint",
    "Classifier",
    "ClassifierConfig",
    "EncoderConfig",
    "FbankConfig",
    "FeatureSettings",
    "NORM_PRESETS",
    "Norm",
    "OfficialImport",
    "PatchGrid",
    "PretrainConfig",
    "PretrainOutput",
    "SSAMBAEncoder",
    "SSAMBAPretrainModel",
    "SSAMBATeacherStudentModel",
    "SSASTConfig",
    "SSASTEncoder",
    "TargetNorm",
    "TeacherStudentConfig",
    "TeacherStudentOutput",
    "TokenCount",
    "Topology",
    "VALIDATION_MASK_COUNT",
    "adapt_encoder_state",
    "adapt_pos_embed",
    "crop_or_pad",
    "fbank",
    "from_pretrained",
    "import_official_checkpoint",
    "load_classifier",
    "load_checkpoint",
    "normalize",
    "norm_stats",
    "save_checkpoint",
    "save_classifier",
    "tokens_per_clip",
    "waveform_to_fbank",
]
