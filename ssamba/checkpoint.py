"""Checkpoints: our own format (weights + model config) and import of official SSAMBA checkpoints.

Our format is a plain dict of tensors and primitive values, so it always loads with
``torch.load(weights_only=True)``: no pickled code runs when a checkpoint is opened.
"""

from __future__ import annotations

import io
import os
import re
from dataclasses import dataclass, field
from typing import Any, BinaryIO

import torch
from torch import nn

from ssamba.encoder import EncoderConfig, PatchGrid, SSAMBAEncoder
from ssamba.pretrain import PretrainConfig, SSAMBAPretrainModel
from ssamba.teacher_student import SSAMBATeacherStudentModel, TeacherStudentConfig

FORMAT = "ssamba-checkpoint"
VERSION = 1
CLASSIFIER_FORMAT = "ssamba-classifier"  # what ssamba.classifier writes: an encoder under a head

Source = str | os.PathLike | BinaryIO | bytes
# The pretraining objectives by the name a checkpoint stores; checkpoints without a name are masked-patch ones.
ObjectiveConfig = PretrainConfig | TeacherStudentConfig
OBJECTIVES: dict[str, type[PretrainConfig] | type[TeacherStudentConfig]] = {
    "masked_patch": PretrainConfig, "teacher_student": TeacherStudentConfig}


def local_path(path: str) -> str:
    """A local path (``file://`` accepted); other URIs are refused with a pointer to the pipeline,
    which resolves them (this package has no S3 client)."""
    if path.startswith("file://"):
        return path[len("file://"):]
    if "://" in path:
        raise ValueError(f"{path!r}: ssamba reads local files and file objects; for URIs use "
                         "pipeline.models.loaders (load_checkpoint, load_classifier, load_hear_model)")
    return path


def read_payload(source: Source) -> dict[str, Any]:
    """What ``torch.save`` wrote to a local path, a file object or bytes, loaded with ``weights_only``.
    URIs are refused with a pointer to the pipeline, which resolves them (this package has no S3 client)."""
    if isinstance(source, str):
        source = local_path(source)
    if isinstance(source, bytes):
        source = io.BytesIO(source)
    return torch.load(source, map_location="cpu", weights_only=True)


@dataclass
class Checkpoint:
    """A loaded checkpoint: the encoder config, optional pretraining config, all weights, extras."""

    encoder_config: EncoderConfig
    state_dict: dict[str, torch.Tensor]
    pretrain_config: ObjectiveConfig | None = None
    metadata: dict[str, Any] = field(default_factory=dict)

    def encoder_state(self) -> dict[str, torch.Tensor]:
        """The encoder's weights, whichever model (encoder, pretraining, classifier) was saved."""
        prefix = "encoder."
        if any(key.startswith(prefix) for key in self.state_dict):
            return {k[len(prefix) :]: v for k, v in self.state_dict.items() if k.startswith(prefix)}
        return dict(self.state_dict)

    def build_encoder(self) -> SSAMBAEncoder:
        encoder = SSAMBAEncoder(self.encoder_config)
        encoder.load_state_dict(self.encoder_state())
        return encoder

    def build_pretrain_model(self) -> SSAMBAPretrainModel | SSAMBATeacherStudentModel:
        """The pretraining model of the saved objective (masked-patch if none was saved), teacher included."""
        config = self.pretrain_config or PretrainConfig()
        kind = SSAMBATeacherStudentModel if isinstance(config, TeacherStudentConfig) else SSAMBAPretrainModel
        model = kind(SSAMBAEncoder(self.encoder_config), self.encoder_config.grid, config)
        model.load_state_dict(self.state_dict)
        return model


def save_checkpoint(
    destination: str | os.PathLike | BinaryIO,
    model: nn.Module,
    encoder_config: EncoderConfig,
    pretrain_config: ObjectiveConfig | None = None,
    metadata: dict[str, Any] | None = None,
) -> None:
    """Write ``model``'s weights with the configs needed to rebuild it. ``metadata`` must hold only
    primitive values (it is read back with ``weights_only=True``)."""
    torch.save(
        {
            "format": FORMAT,
            "version": VERSION,
            "encoder_config": encoder_config.to_dict(),
            "pretrain_config": None if pretrain_config is None else pretrain_config.to_dict(),
            "objective": None if pretrain_config is None else _objective_name(pretrain_config),
            "metadata": metadata or {},
            "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        },
        destination,
    )


def load_checkpoint(source: Source) -> Checkpoint:
    """Read one of our checkpoints (never executes pickled code)."""
    return _checkpoint_of(read_payload(source))


def _checkpoint_of(payload: Any) -> Checkpoint:
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError("not an SSAMBA-on-Ray checkpoint; for official SSAMBA weights use import_official_checkpoint")
    if payload["version"] > VERSION:
        raise ValueError(f"checkpoint version {payload['version']} is newer than this library's {VERSION}")
    pretrain = payload.get("pretrain_config")
    objective = OBJECTIVES[payload.get("objective") or "masked_patch"]
    return Checkpoint(
        encoder_config=EncoderConfig.from_dict(payload["encoder_config"]),
        state_dict=payload["state_dict"],
        pretrain_config=None if pretrain is None else objective(**pretrain),
        metadata=payload.get("metadata", {}),
    )


def _objective_name(config: ObjectiveConfig) -> str:
    return next(name for name, kind in OBJECTIVES.items() if isinstance(config, kind))


# --------------------------------------------------------------------------------------------------
# Official SSAMBA checkpoints (docs/model.md#official-checkpoints)
# --------------------------------------------------------------------------------------------------

# Keys present in official checkpoints that no part of SSAMBA uses (docs/model.md#unused-checkpoint-keys).
_UNUSED_OFFICIAL = re.compile(r"^(v\.head\.(weight|bias)|p_input_fdim|p_input_tdim)$")
_HEADS = re.compile(r"^(cpredlayer|gpredlayer)\.|^mask_embed$")


@dataclass
class OfficialImport:
    """The result of reading an official checkpoint."""

    encoder_config: EncoderConfig
    encoder_state: dict[str, torch.Tensor]
    head_state: dict[str, torch.Tensor]
    dropped_keys: list[str]

    def build_encoder(self) -> SSAMBAEncoder:
        encoder = SSAMBAEncoder(self.encoder_config)
        encoder.load_state_dict(self.encoder_state, strict=True)  # no weight left at its init
        return encoder

    def build_pretrain_model(self, config: PretrainConfig = PretrainConfig()) -> SSAMBAPretrainModel:
        if not self.head_state:
            raise ValueError("this official checkpoint has no pretraining heads (a fine-tuned model?)")
        model = SSAMBAPretrainModel(self.build_encoder(), self.encoder_config.grid, config)
        missing, unexpected = model.load_state_dict(self.head_state, strict=False)
        missing = [key for key in missing if not key.startswith("encoder.")]
        if missing or unexpected:
            raise ValueError(f"official heads do not match: missing {missing}, unexpected {unexpected}")
        return model


def import_official_checkpoint(
    source: Source | dict[str, torch.Tensor],
    grid: PatchGrid | None = None,
    expected_norm: str | None = None,
    drop_path_rate: float = 0.1,
) -> OfficialImport:
    """Read an official SSAMBA ``.pth`` (a DataParallel state dict, ``module.`` prefixed).

    The encoder config is inferred from the weights: width, depth, state size, patch kernel, norm
    type (LayerNorm checkpoints have ``layers.0.norm.bias``, RMSNorm ones do not; docs/model.md#norm-type) and the
    pretraining input size stored in ``p_input_fdim/tdim``. Pass ``grid`` for a fine-tuned
    checkpoint whose stride differs from its kernel. ``expected_norm`` fails loudly if the
    checkpoint's norm type is not the one you meant to use (the official loader silently lost the
    norm biases in that case). Unused official keys are dropped and listed; unknown keys are errors.
    """
    state = source if isinstance(source, dict) else read_payload(source)
    state = {key.removeprefix("module."): value for key, value in state.items()}
    encoder_state: dict[str, torch.Tensor] = {}
    head_state: dict[str, torch.Tensor] = {}
    dropped, unknown = [], []
    for key, value in state.items():
        if _UNUSED_OFFICIAL.match(key):
            dropped.append(key)
        elif key.startswith("v."):
            encoder_state[key[2:]] = value
        elif _HEADS.match(key):
            head_state[key] = value
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(f"unrecognised keys in the official checkpoint: {sorted(unknown)}")
    if "pos_embed" not in encoder_state:
        raise ValueError("not an official SSAMBA checkpoint: no v.pos_embed")

    norm = "layernorm" if "layers.0.norm.bias" in encoder_state else "rmsnorm"
    if expected_norm is not None and expected_norm != norm:
        raise ValueError(f"checkpoint uses {norm} but {expected_norm} was expected (see docs/model.md#norm-type)")
    config = _infer_encoder_config(state, encoder_state, norm, grid, drop_path_rate)
    return OfficialImport(config, encoder_state, head_state, sorted(dropped))


def _infer_encoder_config(
    raw: dict[str, torch.Tensor],
    encoder_state: dict[str, torch.Tensor],
    norm: str,
    grid: PatchGrid | None,
    drop_path_rate: float,
) -> EncoderConfig:
    embed_dim = encoder_state["cls_token"].shape[-1]
    depth = len({key.split(".")[1] for key in encoder_state if key.startswith("layers.")})
    in_proj = encoder_state["layers.0.mixer.in_proj.weight"]
    kernel = encoder_state["patch_embed.proj.weight"].shape[-2:]
    if grid is None:
        fdim = int(raw["p_input_fdim"].item()) if "p_input_fdim" in raw else 128
        tdim = int(raw["p_input_tdim"].item()) if "p_input_tdim" in raw else 1024
        grid = PatchGrid(fdim, tdim, kernel[0], kernel[1], kernel[0], kernel[1])
    if grid.num_patches + 1 != encoder_state["pos_embed"].shape[1]:
        raise ValueError(
            f"grid {grid} gives {grid.num_patches} patches but the positional embedding has "
            f"{encoder_state['pos_embed'].shape[1] - 1}; pass the checkpoint's grid"
        )
    return EncoderConfig(
        embed_dim=embed_dim,
        depth=depth,
        d_state=encoder_state["layers.0.mixer.A_log"].shape[1],
        d_conv=encoder_state["layers.0.mixer.conv1d.weight"].shape[-1],
        expand=in_proj.shape[0] // (2 * embed_dim),
        grid=grid,
        drop_path_rate=drop_path_rate,
        norm=norm,
    )


def load_encoder_weights(source: Source) -> tuple[EncoderConfig, dict[str, torch.Tensor]]:
    """The encoder config and weights of one of our checkpoints, of a classifier file (its fine-tuned
    encoder) or of an official SSAMBA ``.pth``; the source is read once, whichever it holds."""
    payload = read_payload(source)
    kind = payload.get("format") if isinstance(payload, dict) else None
    if kind == FORMAT:
        checkpoint = _checkpoint_of(payload)
        return checkpoint.encoder_config, checkpoint.encoder_state()
    if kind == CLASSIFIER_FORMAT:
        classifier = Checkpoint(EncoderConfig.from_dict(payload["encoder_config"]), payload["state_dict"])
        return classifier.encoder_config, classifier.encoder_state()
    if not isinstance(payload, dict):
        raise ValueError(f"not a model file: it holds a {type(payload).__name__}, not a dict of weights")
    official = import_official_checkpoint(payload)
    return official.encoder_config, official.encoder_state
