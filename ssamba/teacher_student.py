"""Teacher-student pretraining (after data2vec 2.0 and EAT; docs/model.md#teacher-student-objective).

An EMA copy of the encoder (the teacher) encodes each clip once, in full, under ``no_grad``; the
average of its last stages' outputs, each normalised (``target_norm``), is the target for every patch. The
student (the encoder being trained) sees ``clones`` differently masked views of the clip, and only
their visible patches: a sequence of about ``(1 − mask_ratio)·N + 1`` tokens instead of ``N + 1``.
A light convolutional decoder fills the masked positions with a mask token and predicts the
teacher's targets there; the student's [CLS] output regresses the clip's mean target (EAT's
utterance loss). Optionally (``reconstruction_weight``) the decoder also reconstructs the masked
fbank patches themselves, the masked-patch objective's MSE target. The one teacher pass is shared
by all clones, which is what makes many masks per clip cheap.
:meth:`SSAMBATeacherStudentModel.update_teacher` moves the teacher towards the student after every
optimizer step.

The masked-patch objective (:mod:`ssamba.pretrain`) is unchanged; :func:`tokens_per_clip` counts the
encoder tokens of either.
"""

from __future__ import annotations

import copy
import random
from dataclasses import asdict, dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from ssamba.encoder import PatchGrid, SSAMBAEncoder
from ssamba.pretrain import (
    PretrainConfig, check_mask_choice, check_pretraining_grid, gather_tokens, mask_count, masks_to_device, patchify,
)

# The decoder's convolutions: 3×3 over the (frequency, time) patch grid, in groups as in EAT's decoder.
DECODER_KERNEL = 3
DECODER_GROUPS = 16

TargetNorm = Literal["instance", "layer"]
TARGET_NORMS: tuple[TargetNorm, ...] = ("instance", "layer")


@dataclass(frozen=True)
class TeacherStudentConfig:
    """Masking, teacher targets, EMA schedule, decoder size and loss weight of the teacher-student objective.

    ``top_k_blocks`` counts the encoder's stages (a flip-pair is one stage, see
    :attr:`SSAMBAEncoder.num_stages`) and is capped at their number. The teacher's decay goes linearly
    from ``ema_decay_start`` to ``ema_decay_end`` over ``ema_anneal_steps`` optimizer steps, then stays.
    ``target_norm`` is how each stage is normalised before the average (see :func:`average_targets`).
    ``reconstruction_weight`` > 0 adds the MSE between the decoder's reconstruction of each masked
    patch and its normalised fbank values (what :mod:`ssamba.pretrain` regresses): a target that means
    something from the first step, while the EMA teacher is still close to its random init. 0 (the
    default) is EAT's objective."""

    clones: int = 4
    mask_ratio: float = 0.8
    block_size: int = 3
    top_k_blocks: int = 4
    ema_decay_start: float = 0.999
    ema_decay_end: float = 0.9999
    ema_anneal_steps: int = 100_000
    decoder_dim: int = 256
    decoder_depth: int = 2
    utterance_weight: float = 1.0
    target_norm: TargetNorm = "instance"
    reconstruction_weight: float = 0.0

    def __post_init__(self) -> None:
        check_mask_choice(None, self.mask_ratio)
        if self.target_norm not in TARGET_NORMS:
            raise ValueError(f"target_norm must be one of {', '.join(TARGET_NORMS)}, got {self.target_norm!r}")
        for name in ("clones", "block_size", "top_k_blocks", "decoder_depth"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not 0.0 <= self.ema_decay_start <= self.ema_decay_end <= 1.0:
            raise ValueError(f"need 0 ≤ ema_decay_start ≤ ema_decay_end ≤ 1, "
                             f"got {self.ema_decay_start} and {self.ema_decay_end}")
        if self.ema_anneal_steps < 0 or self.utterance_weight < 0 or self.reconstruction_weight < 0:
            raise ValueError("ema_anneal_steps, utterance_weight and reconstruction_weight must not be negative")
        if self.decoder_dim < 1 or self.decoder_dim % DECODER_GROUPS:
            raise ValueError(f"decoder_dim must be a positive multiple of {DECODER_GROUPS}, got {self.decoder_dim}")

    def num_visible(self, num_patches: int) -> int:
        """Patches the student sees per clone: all but the ``mask_ratio`` share (rounded as :func:`mask_count`)."""
        return num_patches - mask_count(num_patches, mask_ratio=self.mask_ratio)

    def ema_decay(self, step: int) -> float:
        """The teacher's decay for the update after optimizer step ``step`` (0-based)."""
        if step < 0:
            raise ValueError(f"step must not be negative, got {step}")
        if step >= self.ema_anneal_steps:
            return self.ema_decay_end
        return self.ema_decay_start + (self.ema_decay_end - self.ema_decay_start) * step / self.ema_anneal_steps

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class TeacherStudentOutput:
    """The loss and what to log (``reconstruction_mse`` is ``None`` without the reconstruction term).
    The two standard deviations (per feature over all rows, averaged over features; no gradient) are
    data2vec's collapse monitors: both fall towards 0 if the student and the teacher settle on a
    constant representation."""

    loss: torch.Tensor
    frame_mse: torch.Tensor
    utterance_mse: torch.Tensor
    reconstruction_mse: torch.Tensor | None
    target_std: torch.Tensor
    prediction_std: torch.Tensor


# --------------------------------------------------------------------------------------------------
# Masking
# --------------------------------------------------------------------------------------------------


def inverse_block_mask(grid: PatchGrid, num_visible: int, block_size: int, rng: random.Random) -> torch.Tensor:
    """The visible patches of one view, sorted ascending (everything else is masked).

    Inverse block masking (data2vec 2.0, EAT): the *visible* region is grown from square blocks of
    ``block_size`` × ``block_size`` patches (capped at the grid's height and width), each placed at a
    uniformly drawn position where it fits in the grid, until ``num_visible`` patches are visible. The
    last block is cut short (its new patches in row-major order) so that every view has exactly
    ``num_visible`` patches and views stack into one batch. Large masked areas cannot be filled in
    from a visible neighbour, which is what makes the task semantic rather than interpolation."""
    rows, cols = grid.freq_patches, grid.time_patches
    height, width = min(block_size, rows), min(block_size, cols)
    offsets = [row * cols + col for row in range(height) for col in range(width)]
    visible: set[int] = set()
    while len(visible) < num_visible:
        corner = rng.randrange(rows - height + 1) * cols + rng.randrange(cols - width + 1)
        for offset in offsets:
            visible.add(corner + offset)
            if len(visible) == num_visible:
                break
    return torch.tensor(sorted(visible))


def sample_visible(grid: PatchGrid, count: int, num_visible: int, block_size: int, rng: random.Random) -> torch.Tensor:
    """``(count, num_visible)`` visible patch indices, one :func:`inverse_block_mask` per row."""
    return torch.stack([inverse_block_mask(grid, num_visible, block_size, rng) for _ in range(count)])


def masked_patches(visible: torch.Tensor, num_patches: int) -> torch.Tensor:
    """The complement of each row of ``visible`` in ``range(num_patches)``, sorted ascending."""
    is_visible = torch.zeros(visible.shape[0], num_patches, dtype=torch.bool).scatter_(1, visible, True)
    return torch.arange(num_patches).expand_as(is_visible)[~is_visible].view(visible.shape[0], -1)


# --------------------------------------------------------------------------------------------------
# Targets and decoder
# --------------------------------------------------------------------------------------------------


def average_targets(stages: list[torch.Tensor], num_prefix_tokens: int, norm: TargetNorm = "instance") -> torch.Tensor:
    """data2vec / EAT targets from teacher stage outputs ``(batch, L, D)``: keep the patch tokens,
    normalise each stage so that no stage's scale dominates, average the stages, then
    layer-normalise each patch (EAT's ``layer_norm_targets``). Float32.

    ``norm="instance"`` (EAT's): per feature over the clip's patches. It takes each feature's clip
    mean out of the targets, so what every patch of a clip shares (a voice, a room, a microphone) is
    not asked for, and the utterance target (the mean over patches) is small. ``norm="layer"``: per
    patch over the features, which keeps those clip-level offsets in the targets."""
    patches = [stage[:, num_prefix_tokens:].float() for stage in stages]
    if norm == "instance":
        normed = [F.instance_norm(tokens.transpose(1, 2)).transpose(1, 2) for tokens in patches]
    else:
        normed = [F.layer_norm(tokens, tokens.shape[-1:]) for tokens in patches]
    mean = torch.stack(normed).mean(0)
    return F.layer_norm(mean, mean.shape[-1:])


class DecoderLayer(nn.Module):
    """A grouped convolution over the (frequency, time) patch grid, LayerNorm without affine, GELU:
    EAT's decoder layer. Channels-last in and out: ``(batch, F, T, dim)``."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(dim, dim, DECODER_KERNEL, padding=DECODER_KERNEL // 2, groups=DECODER_GROUPS)
        self.norm = nn.LayerNorm(dim, elementwise_affine=False)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        convolved = self.conv(image.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        return F.gelu(self.norm(convolved))


class ConvDecoder(nn.Module):
    """The student's outputs at the visible patches, with a learned mask token plus a learned
    positional embedding at every masked patch, through ``depth`` residual :class:`DecoderLayer` on
    the full patch grid: a prediction of the teacher's target for every patch and, with
    ``patch_values`` > 0, a reconstruction of every patch's fbank values. Convolutions see each
    patch's grid neighbours, frequency and time alike, at a cost linear in the patches."""

    def __init__(self, embed_dim: int, grid: PatchGrid, dim: int, depth: int, patch_values: int = 0) -> None:
        super().__init__()
        self.grid = grid
        self.mask_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, grid.num_patches, embed_dim))
        self.project_in = nn.Linear(embed_dim, dim)
        self.layers = nn.ModuleList(DecoderLayer(dim) for _ in range(depth))
        self.project_out = nn.Linear(dim, embed_dim)
        self.project_patches = nn.Linear(dim, patch_values) if patch_values else None
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)

    def forward(self, encoded: torch.Tensor, visible: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(rows, V, D)`` outputs at the ``(rows, V)`` visible patches → ``(rows, N, D)`` predictions
        of the targets, and ``(rows, N, patch_values)`` reconstructions (``None`` without that head)."""
        rows = encoded.shape[0]
        masked_input = (self.mask_token + self.pos_embed).to(encoded.dtype).expand(rows, -1, -1)
        tokens = masked_input.scatter(1, visible.unsqueeze(-1).expand_as(encoded), encoded)
        image = self.project_in(tokens).unflatten(1, (self.grid.freq_patches, self.grid.time_patches))
        for layer in self.layers:
            image = image + layer(image)
        hidden = image.flatten(1, 2)
        return self.project_out(hidden), None if self.project_patches is None else self.project_patches(hidden)


def _feature_std(values: torch.Tensor) -> torch.Tensor:
    return values.detach().reshape(-1, values.shape[-1]).float().std(0).mean()


# --------------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------------


class SSAMBATeacherStudentModel(nn.Module):
    """Student ``encoder`` (a plain :class:`SSAMBAEncoder`, saved and loaded like any encoder), its EMA
    ``teacher``, and the ``decoder``. The state dict holds all three, so a resumed run continues
    with the same teacher; :meth:`ssamba.Checkpoint.encoder_state` picks the student."""

    def __init__(self, encoder: SSAMBAEncoder, grid: PatchGrid, config: TeacherStudentConfig = TeacherStudentConfig()) -> None:
        super().__init__()
        check_pretraining_grid(grid)
        self.encoder, self.grid, self.config = encoder, grid, config
        self.teacher = copy.deepcopy(encoder).requires_grad_(False).eval()
        patch_values = grid.fshape * grid.tshape if config.reconstruction_weight > 0 else 0
        self.decoder = ConvDecoder(encoder.embed_dim, grid, config.decoder_dim, config.decoder_depth, patch_values)
        self.num_visible = config.num_visible(grid.num_patches)
        self.top_k = min(config.top_k_blocks, encoder.num_stages)

    def train(self, mode: bool = True) -> SSAMBATeacherStudentModel:
        """The teacher always runs in eval mode (no drop-path): its targets are deterministic, as in EAT."""
        super().train(mode)
        self.teacher.eval()
        return self

    @torch.no_grad()
    def teacher_targets(self, features: torch.Tensor) -> torch.Tensor:
        """One full teacher pass: the targets of every patch, ``(batch, N, D)`` float32."""
        hidden = self.teacher.add_positions(self.teacher.embed_patches(features))
        stages = self.teacher.stage_outputs(hidden, self.top_k)
        return average_targets(stages, self.teacher.num_prefix_tokens, self.config.target_norm)

    def encode_visible(self, features: torch.Tensor, visible: torch.Tensor, clip: torch.Tensor) -> torch.Tensor:
        """The student on the shorter sequences: row r holds clip ``clip[r]``'s prefix tokens and its
        ``visible[r]`` patches, with their own positional embeddings → ``(rows, prefix + V, D)``."""
        hidden = self.encoder.add_positions(self.encoder.embed_patches(features))
        prefix = self.encoder.num_prefix_tokens
        positions = torch.cat([torch.arange(prefix, device=visible.device).expand(visible.shape[0], -1), visible + prefix], 1)
        return self.encoder.encode_sequence(hidden[clip.unsqueeze(1), positions])

    def forward(self, features: torch.Tensor, rng: random.Random) -> TeacherStudentOutput:
        """Losses for a batch of normalised fbanks ``(batch, frames, mel)``; ``clones`` masks per clip
        drawn from ``rng``. Clone row r belongs to clip ``r // clones`` (``repeat_interleave`` order);
        the targets are indexed per row rather than repeated, which is the same without the copies."""
        clones, patches = self.config.clones, self.grid.num_patches
        count = features.shape[0] * clones
        visible_host = sample_visible(self.grid, count, self.num_visible, self.config.block_size, rng)
        visible = masks_to_device(visible_host, features.device)
        masked = masks_to_device(masked_patches(visible_host, patches), features.device)
        clip = torch.arange(features.shape[0], device=features.device).repeat_interleave(clones)

        targets = self.teacher_targets(features)
        encoded = self.encode_visible(features, visible, clip)
        prefix = self.encoder.num_prefix_tokens
        decoded, reconstructed = self.decoder(encoded[:, prefix:], visible)
        predictions = gather_tokens(decoded, masked).float()
        masked_targets = targets[clip.unsqueeze(1), masked]
        frame_mse = F.mse_loss(predictions, masked_targets)
        utterance_mse = F.mse_loss(encoded[:, 0].float(), targets.mean(1)[clip])  # [CLS] at 0
        loss = frame_mse + self.config.utterance_weight * utterance_mse
        reconstruction_mse = None
        if reconstructed is not None:
            patch_values = patchify(features, self.grid)[clip.unsqueeze(1), masked].float()
            reconstruction_mse = F.mse_loss(gather_tokens(reconstructed, masked).float(), patch_values)
            loss = loss + self.config.reconstruction_weight * reconstruction_mse
        return TeacherStudentOutput(loss, frame_mse, utterance_mse, reconstruction_mse,
                                    _feature_std(masked_targets), _feature_std(predictions))

    @torch.no_grad()
    def update_teacher(self, step: int) -> float:
        """``teacher = d·teacher + (1 − d)·student`` for every parameter, with ``d = config.ema_decay(step)``;
        buffers are copied. Call once per optimizer step, after ``optimizer.step()``, with the 0-based
        number of that step; returns ``d`` (for logging)."""
        decay = self.config.ema_decay(step)
        teacher, student = list(self.teacher.parameters()), list(self.encoder.parameters())
        torch._foreach_mul_(teacher, decay)
        torch._foreach_add_(teacher, student, alpha=1.0 - decay)
        for teacher_buffer, student_buffer in zip(self.teacher.buffers(), self.encoder.buffers()):
            teacher_buffer.copy_(student_buffer)
        return decay


# --------------------------------------------------------------------------------------------------
# Cost
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TokenCount:
    """Encoder tokens per clip per optimizer step (the decoder and the heads are not counted).

    ``student``: tokens through the encoder with gradients (a forward and a backward pass);
    ``teacher``: tokens through the EMA teacher (a forward pass under ``no_grad``)."""

    student: int
    teacher: int

    @property
    def total(self) -> int:
        return self.student + self.teacher

    @property
    def forward_equivalents(self) -> int:
        """The cost in forward-pass tokens, a backward pass counted as two forwards (the usual
        estimate when matrix products dominate): ``3·student + teacher``."""
        return 3 * self.student + self.teacher


def tokens_per_clip(config: PretrainConfig | TeacherStudentConfig, num_patches: int, num_prefix_tokens: int = 1) -> TokenCount:
    """Encoder tokens per clip per step: the masked-patch objective runs one or two full passes of
    ``N + prefix`` tokens; the teacher-student objective ``clones`` student passes of ``V + prefix``
    tokens and one teacher pass of ``N + prefix``."""
    full = num_patches + num_prefix_tokens
    if isinstance(config, PretrainConfig):
        return TokenCount(student=(2 if config.two_pass else 1) * full, teacher=0)
    return TokenCount(student=config.clones * (config.num_visible(num_patches) + num_prefix_tokens), teacher=full)
